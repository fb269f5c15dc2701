"""Models: configs, size presets, the variant registry, the mixers and the decoder LM.

`ltstudy.models.from_pretrained(path)` loads a local Hugging Face Llama or Qwen3 checkpoint.
(Imported lazily: the registry and presets stay torch-free for fast config checks.)
"""


def __getattr__(name: str):
    if name == "from_pretrained":
        from ltstudy.models.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(name)
