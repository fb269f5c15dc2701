"""The passkey prompt in Landmark-attention's layout (epfml/landmark-attention run_test.py), its
needle distance, and greedy decoding that stops at the end-of-document token."""

import pytest
import torch

from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.evaluate.passkey import greedy_decode
from ltstudy.evaluate.passkey_prompt import depth_grid, min_prompt_length, passkey_prompt
from ltstudy.models.transformer import Cache
from tests.test_ruler import tokenizers_under_test  # noqa: F401 (a fixture)

# Landmark's parts, written out here
LANDMARK_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
GRASS = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go."]
GRASS.append("There and back again.")


def grass_sentences(filler: str) -> int:
    """How many whole grass sentences `filler` is, in Landmark's repeating order."""
    count, rest = 0, filler
    while rest:
        sentence = GRASS[count % len(GRASS)]
        assert rest.startswith(sentence), rest[:40]
        rest = rest[len(sentence) :]
        assert rest == "" or rest.startswith(" ")
        rest, count = rest[1:], count + 1
    return count


@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [300, 1000, 4096])
def test_passkey_prompt_is_landmarks_layout_in_whole_sentences(
    tok_name,
    length,
    tokenizers_under_test,  # noqa: F811
):
    tok = tokenizers_under_test[tok_name]
    needle = "The pass key is 31415. Remember it. 31415 is the pass key."
    distances = []
    for depth in depth_grid(5):
        prompt, distance = passkey_prompt(tok, length, depth, 31415)
        assert len(prompt) <= length
        text = tok.decode(prompt)
        instruction, before, line, after, question = text.split("\n")
        assert instruction == LANDMARK_INSTRUCTION and line == needle
        assert question == "What is the pass key? The pass key is"
        n_before, n_after = grass_sentences(before), grass_sentences(after)
        assert n_before == round(depth * (n_before + n_after))
        if tok_name == "bytes":  # trimmed in whole sentences: one more would not fit
            assert length - len(prompt) <= len(" There and back again.")
        # the needle's last token lies `distance` tokens before the prompt's last
        assert tok.decode(prompt[: len(prompt) - distance]).endswith(needle)
        assert "31415" not in tok.decode(prompt[len(prompt) - distance :])
        distances.append(distance)
    assert distances == sorted(distances, reverse=True) and distances[0] > distances[-1]
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        passkey_prompt(tok, 10, 0.5, 31415)


def test_min_prompt_length_is_the_filler_free_prompt():
    bare = f"{LANDMARK_INSTRUCTION}\n\nThe pass key is 50000. Remember it. 50000 is the pass key."
    bare += "\n\nWhat is the pass key? The pass key is"
    assert min_prompt_length(ByteTokenizer()) == len(bare.encode())


class Scripted(torch.nn.Module):
    """A stand-in model that emits a fixed token sequence, one token per call."""

    def __init__(self, script, vocab=258):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.step = script, vocab, 0

    def new_cache(self):
        return Cache()

    def logits_at(self, ids, positions, cache=None):
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, -1, self.script[self.step]] = 1.0
        self.step += 1
        return logits


def test_greedy_decoding_stops_at_the_end_of_document_token():
    eos = ByteTokenizer().eos_id
    script = [*b"42", eos, *b" and more"]
    assert greedy_decode(Scripted(script), [1, 2, 3], 10, "fp32", eos) == list(b"42")
    assert greedy_decode(Scripted(script), [1, 2, 3], 2, "fp32", eos) == list(b"42")
    assert greedy_decode(Scripted(script), [1, 2, 3], 4, "fp32") == script[:4]  # no eos given
