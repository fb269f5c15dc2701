# Render the report (Altair charts, offline Vega bundle) from the collected tables: index.html
# and compare.html, and beside them a page per study (<study>.html), per run
# (runs/<study>/<run>.html) and per run's samples (samples/<study>/<run>.html), whose names
# follow from the runs table; every page is drawn from the tables alone.


rule report:
    input:
        [f"{RESULTS}/{table}.parquet" for table in TABLES],
    output:
        page=f"{REPORTS}/index.html",
        compare=f"{REPORTS}/compare.html",
        bundle=f"{REPORTS}/assets/vega-bundle.js",
    resources:
        **LOCAL_RESOURCES,
    run:
        from ltstudy.report.page import build_report

        build_report(RESULTS, REPORTS)
