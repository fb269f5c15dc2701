"""Write docs/ruler.md: one generated prompt per RULER task, shortened, beside RULER's template.

    .venv/bin/python scripts/ruler_examples.py [--length 4096] [--out docs/ruler.md]

Prompts come from the byte tokenizer and the embedded corpus, as in the demo. SQuAD and
HotpotQA are not bundled, so the QA prompts are drawn from a few made-up records in their
formats.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from ltstudy.data.corpus import embedded_documents
from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.evaluate.ruler import NIAH_SETUP, TASKS, build_sources, generate

# RULER's template (scripts/data/synthetic/constants.py) and generator per task
TEMPLATE = {
    **{task: ("niah", "niah.py") for task in NIAH_SETUP},
    "vt": ("variable_tracking", "variable_tracking.py"),
    "cwe": ("common_words_extraction", "common_words_extraction.py"),
    "fwe": ("freq_words_extraction", "freq_words_extraction.py"),
    "qa_1": ("qa", "qa.py, dataset squad"),
    "qa_2": ("qa", "qa.py, dataset hotpotqa"),
}
KEEP = 260  # characters kept at the start, around the first answer, and at the end
NOTES = """## Where this differs from RULER, and why

- Haystack size: RULER steps the haystack up in fixed increments (25 lines, 500 essay words)
  until prompt + tokens_to_generate would pass max_seq_length; here the count of whole units
  (lines, sentences, words, documents) is bisected to the largest that fits. The budget is
  `evaluate.ruler.max_new_tokens` where that is lower than RULER's.
- Essay haystack: sentences of the corpus's validation documents from a random start, not
  Paul Graham's essays from the beginning.
- Keys: single words of the corpus vocabulary (RULER: wonderwords adjective-noun pairs);
  `niah_multikey_2`'s haystack needs thousands of distinct keys, so there every key is a
  "word-word" pair. Keys within a prompt are distinct.
- vt's one-shot example is sized like RULER's (within 500 tokens with 30 to generate); with
  the byte tokenizer not even one noise line fits that, where RULER's own search would stall,
  so it gets one line.
- Lengths too short for RULER's settings (the demo's 640 and 1,024 bytes, cwe at 4,096 bytes)
  fall back in order: vt and cwe drop the one-shot example, then cwe repeats its common words
  fewer times (down to 2, the others once). With a subword tokenizer, RULER's lengths (4K and
  up) never need this.
- fwe at very short lengths can tie ranks 4 and 5 (both counts 1), as RULER's rule gives.
- qa: sample i asks question i of the file, as in RULER; the distractors and the order are
  drawn with the seed.
"""


def qa_records(folder: Path) -> tuple[str, str]:
    """Small SQuAD- and HotpotQA-format files (two articles, ten questions)."""
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"The town of {town} lies on the river {river}, which "
                        f"floods every {season}.",
                        "qas": [
                            {
                                "question": f"Which river does {town} lie on?",
                                "answers": [{"text": river}],
                            }
                        ],
                    }
                    for town, river, season in rows
                ]
            }
            for rows in (
                [("Arnhold", "Vessa", "spring"), ("Bellrow", "Tamm", "autumn")],
                [("Corvale", "Ister", "winter"), ("Dunmere", "Ouse", "summer")],
            )
        ]
    }
    hotpot = [
        {
            "question": f"Who designed the bridge that crosses the {river}?",
            "answer": person,
            "context": [
                [f"{river} Bridge", [f"The {river} Bridge was designed by {person}. "]],
                [person, [f"{person} was an engineer born in {year}. "]],
            ],
        }
        for river, person, year in (("Vessa", "Ilse Marr", 1871), ("Tamm", "Oskar Lind", 1902))
    ]
    (folder / "squad.json").write_text(json.dumps(squad))
    (folder / "hotpot.json").write_text(json.dumps(hotpot))
    return str(folder / "squad.json"), str(folder / "hotpot.json")


def shorten(text: str, references: list[str]) -> str:
    """The start, the stretch around the first answer in the haystack, and the end."""
    first = min((text.find(r) for r in references if r in text), default=-1)
    if len(text) <= 3 * KEEP or first < 0:
        return text
    parts, start = [text[:KEEP]], max(KEEP, first - KEEP // 2)
    end = min(len(text) - KEEP, first + KEEP // 2)
    if start > KEEP:
        parts.append(" [...] ")
    if end > start:
        parts.append(text[start:end])
    parts += [" [...] ", text[-KEEP:]]
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--out", default="docs/ruler.md")
    args = parser.parse_args()
    texts = [doc.text for _, doc in zip(range(40), embedded_documents(), strict=False)]
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        sources = build_sources(texts, *qa_records(Path(tmp)))
        samples = [generate(task, tok, args.length, 0, 0, sources) for task in TASKS]
    lines = [
        "# RULER prompts, one per task",
        "",
        f"Generated by `scripts/ruler_examples.py` (length {args.length:,} byte tokens, seed 0, "
        "sample 0; the embedded corpus stands in for Paul Graham's essays, and a few made-up "
        "records in SQuAD/HotpotQA format for the QA data). Each prompt is shortened to its "
        f"start, the {KEEP} characters around the first answer, and its end; `[...]` marks a "
        "cut. `prompt` counts the prompt's tokens: with the generation budget it stays within "
        "the length, as in RULER. The template names are those of NVIDIA/RULER "
        "`scripts/data/synthetic/constants.py`, the setups those of `scripts/synthetic.yaml`.",
        "",
    ]
    for sample in samples:
        template, generator = TEMPLATE[sample.task]
        setup = ""
        if sample.task in NIAH_SETUP:
            haystack, key, value, n_keys, n_values, n_queries = NIAH_SETUP[sample.task]
            setup = (
                f"; haystack {haystack}, {key} -> {value}, keys {n_keys}, values {n_values}, "
                f"queries {n_queries}"
            )
        text = tok.decode(sample.prompt)
        shown = re.sub(r"```", "'''", shorten(text, sample.references))
        lines += [
            f"## {sample.task}",
            "",
            f"RULER template `{template}` ({generator}{setup}). prompt {len(sample.prompt):,} "
            f"+ budget {sample.max_new_tokens} tokens <= {args.length:,}; metric "
            f"`string_match_{sample.metric}`; references: "
            + ", ".join(f"`{r}`" for r in sample.references),
            "",
            "```text",
            shown,
            "```",
            "",
        ]
    lines.append(NOTES)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
