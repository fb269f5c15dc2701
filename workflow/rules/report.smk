# Render reports/index.html (Altair charts, offline Vega bundle) from the collected tables.


rule report:
    input:
        [f"{RESULTS}/{table}.parquet" for table in TABLES],
    output:
        page=f"{REPORTS}/index.html",
        bundle=f"{REPORTS}/assets/vega-bundle.js",
    resources:
        **LOCAL_RESOURCES,
    run:
        from ltstudy.report.page import build_report

        build_report(RESULTS, REPORTS)
