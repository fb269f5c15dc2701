"""Context parallelism: one sequence split over K ranks in contiguous spans, in order.

Rank r of a context group holds tokens [offset, offset + length) of every sequence of its
micro-batch. Layers that need what other spans computed receive the `ContextParallel` of the
call (as flash-linear-attention's `cp_context`) and use the exchanges below, which are
differentiable and run on gloo (CPU) as on NCCL:

  gather_spans   every span's tensor, concatenated in sequence order (all-gather KV)
  with_halo      the previous span's last n positions in front of this one (windows, convs)
  prefix_state   the state entering this span from the predecessors' summaries (recurrences
                 whose token step is affine in the state, and sums such as In-Place TTT's)
  relay          a state handed from rank to rank in order (LaCT's nonlinear fast weights)
  from_last      what the last rank holds (a decode cache's states), on every rank

Every exchange moves tensors whose size does not depend on the sequence length, except
gather_spans (keys and values) and with_halo (n positions). Each call counts the bytes this
rank sends, forward and backward, in `traffic` (the communication benchmark reads them).
Spans are multiples of the model's chunk size (`split_spans`), so chunk boundaries fall where
they fall on one process; only the last span may end in a partial chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from ltstudy.parallel.spans import split_spans

__all__ = ["ContextGroup", "ContextParallel", "Traffic", "after", "context_group", "split_spans"]

# Point-to-point tags, far above the ones gloo numbers its collectives with on the same group.
HALO_TAG, RELAY_TAG = 1 << 30, (1 << 30) + 1


@dataclass
class Traffic:
    """Bytes this rank sent, by exchange."""

    sent: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, *tensors: Tensor) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.sent[kind] = self.sent.get(kind, 0) + nbytes


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in one split sequence: its group, its index and every span."""

    group: dist.ProcessGroup
    rank: int
    spans: tuple[int, ...]
    traffic: Traffic = field(default_factory=Traffic, compare=False)

    @property
    def size(self) -> int:
        return len(self.spans)

    @property
    def offset(self) -> int:
        return sum(self.spans[: self.rank])

    @property
    def length(self) -> int:
        return self.spans[self.rank]

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def all_gather(self, x: Tensor) -> Tensor:
        """[K, *x.shape]: every rank's x (same shape on every rank), in rank order."""
        return _AllGather.apply(x, self)

    def gather_spans(self, x: Tensor, dim: int, upto: int | None = None) -> Tensor:
        """Every span's x (span-long along `dim`) concatenated in sequence order, through
        rank `upto` (default: all)."""
        upto = self.size - 1 if upto is None else upto
        longest = max(self.spans)
        moved = x.movedim(dim, 0)
        padded = torch.cat([moved, moved.new_zeros(longest - moved.shape[0], *moved.shape[1:])])
        pieces = self.all_gather(padded)
        whole = torch.cat([pieces[r, : self.spans[r]] for r in range(upto + 1)])
        return whole.movedim(0, dim)

    def with_halo(self, x: Tensor, n: int, dim: int) -> Tensor:
        """The previous span's last n positions of x, then x (the first span: x alone)."""
        if n <= 0:
            return x
        for r in range(self.size - 1):
            if self.spans[r] < n:
                raise ValueError(
                    f"context-parallel span {r} has {self.spans[r]} tokens, fewer than the "
                    f"{n} the next span needs from it (a window or conv): lower parallel.context"
                )
        return _Halo.apply(x, n, dim, self)

    def prefix_state(
        self,
        summary: Sequence[Tensor],
        fold: Callable[[Tensor, tuple[Tensor, ...]], Tensor],
        initial: Tensor,
    ) -> Tensor:
        """The state entering this span: `initial` folded through every earlier span's
        summary in order, state = fold(state, summary_j). Summaries are all-gathered at once,
        so no rank waits for another's pass over its tokens."""
        gathered = [self.all_gather(s) for s in summary]
        state = initial
        for j in range(self.rank):
            state = fold(state, tuple(g[j] for g in gathered))
        return after(state, *gathered)  # the gathers' backward runs on every rank

    def relay(
        self,
        initial: Sequence[Tensor],
        run: Callable[[tuple[Tensor, ...]], tuple[Tensor, Sequence[Tensor]]],
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run this span from the previous rank's final state (the first rank from
        `initial`), hand the final state to the next rank; (output, final state). Ranks run
        in order: use only where the state's update is not affine.

        Between its two backward steps (receiving the final state's gradient from the next
        rank, sending the entry state's to the previous one) a rank must not join any other
        exchange, or it would wait on a rank that waits on it: build a layer's other
        exchanges on the relay's output (`after`), so their backward runs first."""
        state = tuple(initial)
        if not self.first:
            # A leaf that needs a gradient keeps the receive in the graph even when `initial`
            # does not need one: the previous rank waits for the state's gradient.
            anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
            state = _ReceivePrevious.apply(self, anchor, *state)
        out, final = run(state)
        final = tuple(final)
        if not self.last:
            out = _SendNext.apply(self, out, *final)
        return out, final

    def from_last(self, tree: Any, device: torch.device) -> Any:
        """`tree` (nested dicts, lists, tuples of tensors and plain values) as the last rank
        holds it, on every rank: its structure, then each tensor, is broadcast (no grad)."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        source = self.global_rank(self.size - 1)
        leaves, spec = tree_flatten(tree)
        shapes = [(x.shape, x.dtype) if isinstance(x, Tensor) else None for x in leaves]
        header = [(spec, shapes, [None if isinstance(x, Tensor) else x for x in leaves])]
        dist.broadcast_object_list(header, src=source, group=self.group)
        spec, shapes, values = header[0]
        out = []
        for index, (shape, value) in enumerate(zip(shapes, values, strict=True)):
            if shape is None:
                out.append(value)
                continue
            t = leaves[index].detach().contiguous() if self.last else None
            if t is None:
                t = torch.empty(shape[0], dtype=shape[1], device=device)
            dist.broadcast(t, src=source, group=self.group)
            out.append(t)
        return tree_unflatten(out, spec)


def after(x: Tensor, *others: Tensor) -> Tensor:
    """x, made to depend on `others`: autograd visits them (with zero gradients) only after
    x's gradient is known. Orders exchanges, and makes a collective whose result this rank
    does not use still take part in the backward pass."""
    return _Tie.apply(x, *others)


@dataclass(frozen=True)
class ContextGroup:
    """The ranks of a job that share each sequence, and this rank's place among them."""

    group: dist.ProcessGroup
    rank: int
    size: int
    data_rank: int  # which share of the batch the group takes

    def split(self, length: int, multiple: int = 1) -> ContextParallel:
        """This rank's place in a `length`-token sequence (spans multiples of `multiple`)."""
        return ContextParallel(self.group, self.rank, split_spans(length, self.size, multiple))


def context_group(device_type: str, world_size: int, degree: int) -> ContextGroup:
    """Arrange a job's ranks as a (data, context) mesh, consecutive ranks sharing a sequence
    (on one node where the degree allows, for the fast links), and return this rank's place."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % degree:
        raise ValueError(f"parallel.context {degree} does not divide the job's {world_size} ranks")
    mesh = init_device_mesh(
        device_type, (world_size // degree, degree), mesh_dim_names=("data", "context")
    )
    return ContextGroup(
        mesh.get_group("context"),
        mesh.get_local_rank("context"),
        degree,
        mesh.get_local_rank("data"),
    )


def _nccl(cp: ContextParallel) -> bool:
    return dist.get_backend(cp.group) == "nccl"


class _AllGather(Function):
    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        ctx.cp = cp
        x = x.contiguous()
        out = x.new_empty(cp.size, *x.shape)
        dist.all_gather(list(out.unbind(0)), x, group=cp.group)
        cp.traffic.add("all_gather", *([x] * (cp.size - 1)))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cp = ctx.cp
        grad = grad.contiguous()
        if _nccl(cp):
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=cp.group)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's part
            dist.all_reduce(grad, group=cp.group)
            mine = grad[cp.rank]
        cp.traffic.add("all_gather", *([grad[0]] * (cp.size - 1)))
        return mine, None


def _exchange(sends: list[tuple[Tensor, int]], receives: list[tuple[Tensor, int]], tag: int):
    """Post every send and receive at once (no pair of ranks waits on the other), then wait."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer in receives]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class _Halo(Function):
    @staticmethod
    def forward(ctx, x: Tensor, n: int, dim: int, cp: ContextParallel) -> Tensor:
        ctx.n, ctx.dim, ctx.cp = n, dim, cp
        sends, receives = [], []
        if not cp.last:
            tail = x.narrow(dim, x.shape[dim] - n, n).contiguous()
            sends.append((tail, cp.global_rank(cp.rank + 1)))
            cp.traffic.add("halo", tail)
        halo = None
        if not cp.first:
            shape = list(x.shape)
            shape[dim] = n
            halo = x.new_empty(shape)
            receives.append((halo, cp.global_rank(cp.rank - 1)))
        _exchange(sends, receives, HALO_TAG)
        return x.clone() if halo is None else torch.cat([halo, x], dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, dim, cp = ctx.n, ctx.dim, ctx.cp
        sends, receives = [], []
        if not cp.first:
            to_previous = grad.narrow(dim, 0, n).contiguous()
            sends.append((to_previous, cp.global_rank(cp.rank - 1)))
            cp.traffic.add("halo", to_previous)
            grad = grad.narrow(dim, n, grad.shape[dim] - n)
        grad = grad.clone()
        if not cp.last:
            shape = list(grad.shape)
            shape[dim] = n
            from_next = grad.new_empty(shape)
            receives.append((from_next, cp.global_rank(cp.rank + 1)))
        _exchange(sends, receives, HALO_TAG)
        if not cp.last:
            grad.narrow(dim, grad.shape[dim] - n, n).add_(from_next)
        return grad, None, None, None


class _Tie(Function):
    @staticmethod
    def forward(ctx, x: Tensor, *others: Tensor) -> Tensor:
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        zeros = [torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.shapes]
        return grad, *zeros


class _ReceivePrevious(Function):
    """The previous rank's final state (shaped as `templates`); its gradient goes back."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, anchor: Tensor, *templates: Tensor) -> tuple[Tensor, ...]:
        ctx.cp = cp
        state = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in templates]
        _exchange([], [(t, cp.global_rank(cp.rank - 1)) for t in state], RELAY_TAG)
        return tuple(state)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        cp = ctx.cp
        grads = [g.contiguous() for g in grads]
        _exchange([(g, cp.global_rank(cp.rank - 1)) for g in grads], [], RELAY_TAG)
        cp.traffic.add("relay", *grads)
        return None, None, *(None for _ in grads)


class _SendNext(Function):
    """Identity on `out` that sends the final state to the next rank; in the backward pass
    the gradient of that state comes back from it."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, out: Tensor, *final: Tensor) -> Tensor:
        ctx.cp = cp
        ctx.shapes = [(f.shape, f.dtype) for f in final]
        final = [f.contiguous() for f in final]
        _exchange([(f, cp.global_rank(cp.rank + 1)) for f in final], [], RELAY_TAG)
        cp.traffic.add("relay", *final)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cp = ctx.cp
        grads = [grad_out.new_empty(s, dtype=d) for s, d in ctx.shapes]
        _exchange([], [(g, cp.global_rank(cp.rank + 1)) for g in grads], RELAY_TAG)
        return None, grad_out, *grads
