"""In-Place TTT MLP: a SwiGLU whose down projection is also a fast weight.

The fast weight is written with V̂ = Conv1D(X) W_target, where X is the token embeddings (or the
MLP's own input), the conv is depthwise over time and zero-initialised, and W_target starts
diagonal. A zero conv gives V̂ = 0, so the layer starts exactly as its backbone MLP.

Decoding keeps, per layer, what earlier chunks wrote (`S`) and the inputs of the chunk being
filled; when that chunk completes its target is computed and its write applied, exactly as the
chunked training form does.

With `reset_at_documents` the fast weights start again from W_down at every document start
(the model marks them, see LanguageModel.document_starts), in training, evaluation and decoding
alike: each document is run as its own sequence, chunks aligned to its start.

Clipping (`clip_tau`) is the paper's inference-time rule: with `clip_at: inference` it is off
while the outer loop trains (module in train mode with autograd on) and on otherwise.

Context parallelism: a chunk's write does not read the fast weight, so each rank runs its span
from a zero state and adds what the earlier spans wrote (the exclusive prefix sum of their
final states, one all-gather of [B, D, F]); the fast output is linear in that state. The
causal target conv reads the previous span's last kernel - 1 source tokens (a halo); the
chunk-local one needs nothing, spans being whole chunks. A split prefill (a context and an
empty cache) leaves in the cache what decoding needs: the sum of every write so far, the
source tokens before the pending chunk (a halo when the span holds none) and that chunk's
inputs; the last rank's cache is the sequence's.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import TTTConfig
from ltstudy.models.layers import SwiGLU
from ltstudy.ops.ttt import inplace_ttt
from ltstudy.parallel.context import ContextParallel


class TargetConv(nn.Module):
    """Depthwise conv over time with chunk-local two-sided or sequence-causal padding."""

    def __init__(self, dim: int, kernel: int, padding: str, chunk_size: int):
        super().__init__()
        self.kernel, self.padding, self.chunk_size = kernel, padding, chunk_size
        self.weight = nn.Parameter(torch.zeros(dim, 1, kernel))

    def forward(self, x: Tensor, history: Tensor | None = None) -> Tensor:
        """x: [B, T, D], starting at a chunk boundary. `history` holds the tokens before x
        (only the causal padding reads them)."""
        B, T, D = x.shape
        weight = self.weight.to(x.dtype)
        if self.padding == "causal":
            if history is None:
                history = x.new_zeros(B, self.kernel - 1, D)
            h = torch.cat([history[:, history.shape[1] - (self.kernel - 1) :], x], dim=1)
            return F.conv1d(h.transpose(1, 2), weight, groups=D).transpose(1, 2)
        C = self.chunk_size
        pad = -T % C
        h = F.pad(x, (0, 0, 0, pad)).view(-1, C, D).transpose(1, 2)  # [B*N, D, C]
        left = (self.kernel - 1) // 2
        h = F.conv1d(F.pad(h, (left, self.kernel - 1 - left)), weight, groups=D)
        return h.transpose(1, 2).reshape(B, T + pad, D)[:, :T]


class InPlaceTTTMLP(SwiGLU):
    def __init__(self, d_model: int, d_ff: int, ttt: TTTConfig, kernels: str = "reference"):
        super().__init__(d_model, d_ff)
        self.ttt, self.kernels = ttt, kernels
        self.ttt_conv = (
            TargetConv(d_model, ttt.conv_kernel, ttt.conv_padding, ttt.chunk_size)
            if ttt.conv_kernel > 0
            else None
        )
        self.ttt_proj = nn.Linear(d_model, d_model, bias=False) if ttt.w_target else None

    def target(self, source: Tensor, history: Tensor | None = None) -> Tensor:
        v = source if self.ttt_conv is None else self.ttt_conv(source, history)
        return v if self.ttt_proj is None else self.ttt_proj(v)

    @property
    def history_length(self) -> int:
        """Source tokens a decode cache keeps from before the pending chunk (the causal
        conv's reach)."""
        return max(self.ttt.conv_kernel - 1, 1)

    def clipping(self) -> bool:
        """Whether updates are clipped now: always, or (`clip_at: inference`) unless the outer
        loop is training, i.e. unless the module is in train mode with autograd on."""
        if self.ttt.clip_tau is None:
            return False
        training = self.training and torch.is_grad_enabled()
        return self.ttt.clip_at == "always" or not training

    def _run_chunks(
        self, z: Tensor, source: Tensor, state: Tensor | None = None, history: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return inplace_ttt(
            z,
            self.target(source, history),
            self.down_proj.weight,
            eta=self.ttt.eta,
            chunk_size=self.ttt.chunk_size,
            clip_tau=self.ttt.clip_tau if self.clipping() else None,
            clip_order=self.ttt.clip_order,
            state=state,
            kernels=self.kernels,
        )

    def forward(
        self,
        x: Tensor,
        embeddings: Tensor | None = None,
        cache: dict | None = None,
        doc_starts: Tensor | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """`doc_starts` [B, T] (bool) marks where documents begin; with `reset_at_documents`
        the fast weights restart there (with a cache, the next call continues the last one's
        document unless its first token is marked). With a `context`, x is this rank's span."""
        source = x if self.ttt.target == "mlp_input" else embeddings
        z = self.activations(x)
        if context is not None:
            if doc_starts is not None and self.ttt.reset_at_documents:
                raise NotImplementedError(
                    "model.ttt.reset_at_documents with context parallelism (parallel.context > 1)"
                )
            return self._forward_span(z, source, context, cache)
        if doc_starts is None or not self.ttt.reset_at_documents:
            if cache is not None:
                return self._forward_cached(z, source, cache)
            return self._run_chunks(z, source)[0]
        # Each row on its own: its documents start at different places.
        rows = None if cache is None else cache.setdefault("rows", [{} for _ in range(z.shape[0])])
        outputs = []
        for b in range(z.shape[0]):
            starts = [int(i) for i in doc_starts[b].nonzero().flatten()]
            pieces = []
            for s, e in itertools.pairwise(sorted({0, *starts, z.shape[1]})):
                zb, sb = z[b : b + 1, s:e], source[b : b + 1, s:e]
                if rows is None:
                    pieces.append(self._run_chunks(zb, sb)[0])
                    continue
                if doc_starts[b, s]:
                    rows[b].clear()  # a new document: back to W_down, chunks from here
                pieces.append(self._forward_cached(zb, sb, rows[b]))
            outputs.append(torch.cat(pieces, dim=1))
        return torch.cat(outputs, dim=0)

    def _forward_span(
        self, z: Tensor, source: Tensor, context: ContextParallel, cache: dict | None = None
    ) -> Tensor:
        """This rank's span: its own writes from zero, plus the earlier spans' writes. A cache
        (a split prefill) ends as `_forward_cached` leaves it after the whole sequence."""
        conv = self.ttt_conv
        n = conv.kernel - 1 if conv is not None and conv.padding == "causal" else 0
        if cache is not None:
            n = self.history_length
        history = None
        if n > 0:
            source = context.with_halo(source, n, dim=1)
            if not context.first:
                history, source = source[:, :n], source[:, n:]
        out, written = self._run_chunks(z, source, history=history)
        entry = context.prefix_state(
            [written], fold=lambda s, p: s + p[0], initial=torch.zeros_like(written)
        )
        if cache is not None:
            self._fill_prefill_cache(cache, z, source, history, entry + written)
        return out + torch.einsum("btf,bdf->btd", z, entry.to(z.dtype))

    def _fill_prefill_cache(
        self, cache: dict, z: Tensor, source: Tensor, history: Tensor | None, state: Tensor
    ) -> None:
        """What `_forward_cached` holds after the sequence up to this span's end: the sum of
        the writes, the source tokens before the pending chunk, and that chunk's inputs."""
        tail = z.shape[1] % self.ttt.chunk_size
        complete = z.shape[1] - tail
        cache["S"] = state
        before = (
            source[:, :complete]
            if history is None
            else torch.cat([history, source[:, :complete]], 1)
        )
        if before.shape[1]:
            cache["history"] = before[:, -self.history_length :]
        if tail:
            cache["z"], cache["source"] = z[:, complete:], source[:, complete:]

    def _forward_cached(self, z: Tensor, source: Tensor, cache: dict) -> Tensor:
        C = self.ttt.chunk_size
        outputs = []
        # 1. Fill the pending chunk: apply the current fast weight, write once it is complete.
        pending = cache.get("z")
        if pending is not None:
            take = min(C - pending.shape[1], z.shape[1])
            zi, si = z[:, :take], source[:, :take]
            outputs.append(
                F.linear(zi, self.down_proj.weight) + torch.einsum("btf,bdf->btd", zi, cache["S"])
            )
            cache["z"] = torch.cat([pending, zi], dim=1)
            cache["source"] = torch.cat([cache["source"], si], dim=1)
            z, source = z[:, take:], source[:, take:]
            if cache["z"].shape[1] == C:
                _, cache["S"] = self._run_chunks(
                    cache["z"], cache["source"], cache["S"], cache.get("history")
                )
                cache["history"] = cache["source"]
                del cache["z"], cache["source"]
        # 2. The rest starts at a chunk boundary: the chunked form, continuing from the state.
        if z.shape[1]:
            out, cache["S"] = self._run_chunks(z, source, cache.get("S"), cache.get("history"))
            outputs.append(out)
            tail = z.shape[1] % C
            complete = z.shape[1] - tail
            if complete:
                cache["history"] = source[:, :complete][:, -self.history_length :]
            if tail:
                cache["z"], cache["source"] = z[:, complete:], source[:, complete:]
        return torch.cat(outputs, dim=1)
