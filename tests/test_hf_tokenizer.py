"""A checkpoint's tokenizer adds the special tokens transformers adds: small BPE tokenizers in
the layouts of Llama-3 (post-processor <|begin_of_text|> $A) and Qwen3 (no BOS), and with
tokenizer_config.json flags that transformers 5 ignores, are saved to a folder; our encoding
is compared with transformers' AutoTokenizer loaded from the same folder."""

import json

import pytest

from ltstudy.data.tokenizer import ByteTokenizer, HFTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "There is an important info hidden inside a lot of irrelevant text.",
    "The grass is green. The sky is blue. The sun is yellow. Here we go.",
    "The pass key is 68231. Remember it. 68231 is the pass key.",
]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def save_tokenizer(folder, layout: str) -> None:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    template = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    config = {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}
    if layout in ("llama3", "llama3_config_says_no"):  # Llama-3's tokenizer.json
        tok.post_processor = processors.Sequence([byte_level, template])
    elif layout == "bos_and_eos":
        both = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}",
            special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
        )
        tok.post_processor = processors.Sequence([byte_level, both])
    else:
        tok.post_processor = byte_level
    # transformers 5 ignores these two when there is a tokenizer.json: its post-processor rules
    if layout == "llama3_config_says_no":
        config["add_bos_token"] = False
    elif layout == "config_says_bos":
        config["add_bos_token"] = True
    elif layout == "qwen3":
        config.update(bos_token=None, add_bos_token=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "layout", ["llama3", "llama3_config_says_no", "config_says_bos", "bos_and_eos", "qwen3"]
)
def test_special_tokens_as_transformers_adds_them(tmp_path, layout):
    save_tokenizer(tmp_path, layout)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = HFTokenizer(tmp_path)
    text = TEXTS[2] + " " + TEXTS[0]
    full = reference(text)["input_ids"]
    plain = reference(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == plain
    assert ours.encode(text, add_special_tokens=True) == full
    assert ours.eos_id == reference.convert_tokens_to_ids(EOS)

    starts_with_bos = layout in ("llama3", "llama3_config_says_no", "bos_and_eos")
    assert (full[0] == reference.convert_tokens_to_ids(BOS)) == starts_with_bos
    assert ours.bos_id == (full[0] if starts_with_bos else None)
    # with_bos gives transformers' start of a whole text (its EOS, if it adds one, aside) ...
    assert ours.with_bos(plain) == (full[:-1] if layout == "bos_and_eos" else full)
    # ... and a prompt built from pieces gets the BOS once, at the start
    body = ours.encode(TEXTS[2]) + ours.encode(TEXTS[1]) + ours.encode(TEXTS[0])
    assert ours.with_bos(body) == full[:1] * starts_with_bos + body


def test_bytes_have_no_bos():
    tok = ByteTokenizer()
    assert tok.bos_id is None
    assert tok.with_bos(tok.encode("ab")) == tok.encode("ab", add_special_tokens=True) == [97, 98]


@pytest.mark.parametrize("layout", ["llama3", "qwen3"])
def test_training_documents_start_as_transformers_starts_a_text(tmp_path, layout):
    from ltstudy.data.corpus import Document
    from ltstudy.data.dataset import encode_document

    save_tokenizer(tmp_path, layout)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = HFTokenizer(tmp_path)
    eos = reference.convert_tokens_to_ids(EOS)
    ids, spans = encode_document(ours, Document("a", TEXTS[0]))
    assert ids == [*reference(TEXTS[0])["input_ids"], eos] and spans == []

    text = TEXTS[2]
    start = text.index("68231")
    ids, spans = encode_document(ours, Document("b", text, answers=((start, start + 5),)))
    assert ids[0] == reference(text)["input_ids"][0] and ids[-1] == eos
    ((a, b),) = spans
    assert reference.decode(ids[a:b]) == "68231"
