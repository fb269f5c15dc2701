"""Short-context tasks through lm-evaluation-harness (the paper's Table 3: HellaSwag, ARC-E/C,
MMLU, PIQA), on a trained run's model.

`HarnessLM` is the harness's model interface over our model: log-likelihoods from one forward
pass over context + continuation, greedy generation through the decoding cache. Datasets come
from the local Hugging Face cache only (offline); a task whose data is absent is recorded as
skipped with the reason, as RULER's QA is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.device import autocast
from ltstudy.evaluate.setup import trained_model
from ltstudy.models.attention import reserve_kv_cache
from ltstudy.results.schemas import identity, write_table


def encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """The one place this stage turns text into token ids. As the harness's Hugging Face model
    does: a text starts with the tokenizer's BOS (Llama-3's; none for bytes or Qwen3) unless
    the harness asks for none (a continuation after an empty context)."""
    ids = tokenizer.encode(text)
    return ids if add_special_tokens is False else tokenizer.with_bos(ids)


class HarnessLM(TemplateLM):
    """lm-evaluation-harness's LM interface over one of our models.

    The harness splits each request into context and continuation tokens (`_encode_pair`);
    here a continuation's log-likelihood is the sum of its tokens' log-probabilities after
    the context, read from one forward pass, truncated on the left to `max_length` tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int,
        dtype: str = "fp32",
        batch_size: int = 1,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        self.model = model
        self.tok = tokenizer
        self.max_length = max_length
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.where = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the tokenizer has one, else end-of-document."""
        return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return encode(self.tok, string, add_special_tokens)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it), per
        request. Longest first in batches, right-padded: the model is causal, so padding after
        a sequence does not change its logits. The LM head runs on the continuation's
        positions only (a large vocabulary's logits of a whole few-shot prompt are gigabytes)."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            seqs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :] for i in batch]
            ids = torch.full((len(batch), max(len(s) for s in seqs) - 1), self.eot_token_id)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            with autocast(self.where, self.dtype):
                hidden = self.model.hidden_states(ids.to(self.where))
            for row, (i, seq) in enumerate(zip(batch, seqs, strict=True)):
                n = min(len(requests[i][2]), len(seq) - 1)
                target = torch.tensor(seq[len(seq) - n :], device=self.where)
                with autocast(self.where, self.dtype):
                    logits = self.model.lm_head(hidden[row, len(seq) - 1 - n : len(seq) - 1])
                logprobs = F.log_softmax(logits.float(), dim=-1)
                total = float(logprobs.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((logprobs.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods (perplexity tasks) in disjoint windows of max_length."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [(None, *make_disjoint_window(w)) for w in windows]
            out.append(sum(score for score, _ in self._loglikelihood_tokens(pairs)))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations through the cache, cut at EOS or the first stop string. Sampling
        settings are ignored: every generation is greedy."""
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            out.append(self._greedy(prompt, max_new, until))
        return out

    def _greedy(self, prompt: list[int], max_new: int, until: list[str]) -> str:
        cache = self.model.new_cache()
        reserve_kv_cache(cache, len(prompt) + max_new)
        ids = torch.tensor([prompt], device=self.where)
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            with autocast(self.where, self.dtype):
                token = int(self.model.logits_at(ids, -1, cache)[0, -1].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tok_decode(new)
            if any(stop in text for stop in until):
                break
            ids = torch.tensor([[token]], device=self.where)
        for stop in until:
            text = text.split(stop)[0]
        return text


def harness_rows(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per (task or subtask, metric, filter) of a `simple_evaluate` result."""
    rows = []
    for name, metrics in results["results"].items():
        samples = results.get("n-samples", {}).get(name, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "subtask": name,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "num_fewshot": results.get("n-shot", {}).get(name),
                    "samples": samples,
                    "status": "ok",
                    "reason": None,
                }
            )
    return rows


def work_offline() -> None:
    """Read datasets from the local Hugging Face cache only, never the network. datasets and
    huggingface_hub read the environment once, at import, so flags of an already imported
    module are set too."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def run_tasks(
    lm: HarnessLM, cfg: Mapping[str, Any], label: str = "lm_eval"
) -> list[dict[str, Any]]:
    """Each configured task through lm-evaluation-harness on its own, so that one task without
    local data is skipped (with the reason) and the others still run."""
    work_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=cfg["include_path"])
    rows = []
    for task in cfg["tasks"]:
        try:
            loaded = manager.load([task])
        except KeyError:
            raise ValueError(
                f"config field `evaluate.lm_eval.tasks`: lm-evaluation-harness knows no task "
                f"{task!r} (include_path: {cfg['include_path']})"
            ) from None
        except OSError as err:  # absent from the local cache (offline), or a missing file
            rows.append(skipped_row(task, f"{type(err).__name__}: {err}"))
            print(f"[{label}] {task}: skipped ({err})", flush=True)
            continue
        group = loaded["groups"].get(task)  # a group (mmlu) carries its subtasks
        results = simple_evaluate(
            model=lm,
            tasks=[group] if group else list(loaded["tasks"].values()),
            num_fewshot=cfg["num_fewshot"],
            limit=cfg["limit"],
            task_manager=manager,
            log_samples=False,
        )
        rows += harness_rows(results, task)
        summary = ", ".join(f"{r['metric']} {r['value']:.4f}" for r in rows if r["subtask"] == task)
        print(f"[{label}] {task}: {summary}", flush=True)
    return rows


def skipped_row(task: str, reason: str) -> dict[str, Any]:
    return {
        "task": task,
        "subtask": task,
        "metric": None,
        "filter": None,
        "value": None,
        "stderr": None,
        "num_fewshot": None,
        "samples": None,
        "status": "skipped",
        "reason": reason,
    }


def evaluate_lm_eval(spec: Mapping[str, Any], out_path: str) -> None:
    cfg = spec["evaluate"]["lm_eval"]
    lm = HarnessLM(
        trained_model(spec),
        get_tokenizer(spec["data"]["tokenizer"]),
        max_length=spec["context"],
        dtype=spec["train"]["dtype"],
        batch_size=cfg["batch_size"],
        max_gen_toks=cfg["max_gen_toks"],
    )
    rows = run_tasks(lm, cfg, label=f"lm_eval {spec['run_id']}")
    write_table("lm_eval", [{**identity(spec), **row} for row in rows], out_path)
