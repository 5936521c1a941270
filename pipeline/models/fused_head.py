"""Fused, chunked LM head + cross-entropy: the loss and its gradients in one pass, no full logits.

``linear_cross_entropy`` computes, chunk by chunk over tokens, the logits of a chunk, its NLL and (when
gradients are wanted) the gradient of the NLL with respect to the chunk's hidden states and the
head's weight; then the chunk's logits are dropped. So the full-vocabulary logits never exist, and
a backward pass needs no head recompute: segment checkpointing recomputes only the decoder.

The gradient with respect to the hidden states is saved per call (the size of the hidden states)
and scaled by the incoming gradient in the backward, exactly, also when calls are weighted
differently. The weight's gradient is the same matrix for every call, so it is accumulated over
the calls of one forward in one float32 buffer (``HeadGradients``) and handed to autograd once, by
``attach_head_gradients`` on the stacked per-call NLL sums; that is exact when every call enters
the loss with the same weight (the mean loss over all targets: the gradients of the stacked sums
are equal) and an error otherwise, unless the backward does not reach the head's parameters
(``autograd.grad`` of one segment's NLL with respect to the inputs is exact for any weighting).
The per-token NLL (``per_token``) carries no gradient here. Memory: one float32 weight-sized
buffer per forward, the hidden-state gradients, and one chunk of logits at a time.

ZeRO-3: the head's parameters are read only inside the head module's own forward (both functions
run as its forward, so DeepSpeed's hooks gather them around it), and the weight gradient reaches
the parameter through autograd, where DeepSpeed's gradient hooks see it summed with the tied
input embedding's own gradient. Self-contained (shipped with exported models).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 22  # logits per chunk (16 MiB in float32): rows = CHUNK_LOGITS // vocabulary size


class HeadGradients:
    """Gradient of the sum of every call's NLL with respect to the head weight (and bias), float32."""

    def __init__(self) -> None:
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def add(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight if self.weight is None else self.weight.add_(weight)
        if bias is not None:
            self.bias = bias if self.bias is None else self.bias.add_(bias)


def _as_forward_of(module: nn.Module, fn: Callable, *args):
    """Call ``fn(*args)`` as ``module``'s forward, so that hooks on the module run around it (ZeRO-3
    gathers the module's parameters in its pre-forward hook and re-gathers them for the backward)."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class _ChunkedNLL(torch.autograd.Function):
    """(NLL sum, per-token NLL [N]) of ``linear(hidden, weight, bias)``; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                grads: HeadGradients | None):
        ctx.set_materialize_grads(False)
        want_hidden = ctx.needs_input_grad[0]
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        token_nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = grad_bias = None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = nn.functional.linear(h, weight, bias).float()
            counted = t != IGNORE_INDEX
            picked = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            token_nll[start:start + rows] = (lse - logits.gather(1, picked).squeeze(1)) * counted
            if not (want_hidden or grads is not None):
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # d nll / d logits = softmax - one_hot
            probs.scatter_add_(1, picked, torch.full_like(lse, -1.0).unsqueeze(1))
            grad_logits = probs.mul_(counted.unsqueeze(1)).to(hidden.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + rows])
            if grads is not None:
                chunk_weight = torch.mm(grad_logits.t(), h).float()
                grad_weight = chunk_weight if grad_weight is None else grad_weight.add_(chunk_weight)
                if bias is not None:
                    chunk_bias = grad_logits.float().sum(0)
                    grad_bias = chunk_bias if grad_bias is None else grad_bias.add_(chunk_bias)
        if grads is not None and grad_weight is not None:
            grads.add(grad_weight, grad_bias)
        ctx.save_for_backward(grad_hidden)
        return token_nll.sum(), token_nll

    @staticmethod
    def backward(ctx, grad_sum: torch.Tensor | None, grad_token: torch.Tensor | None):
        if grad_token is not None:
            raise RuntimeError("the fused LM head gives no gradient through the per-token NLL; "
                               "build the loss from the NLL sums (or set fused_head=False)")
        (grad_hidden,) = ctx.saved_tensors
        if grad_sum is None or grad_hidden is None:
            return None, None, None, None, None
        return grad_hidden * grad_sum.to(grad_hidden.dtype), None, None, None, None


class _AttachWeightGradient(torch.autograd.Function):
    """Identity on the stacked NLL sums; its backward hands the accumulated weight gradient to autograd."""

    @staticmethod
    def forward(ctx, nll: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grads: HeadGradients,
                accumulators: list):
        ctx.grads, ctx.accumulators = grads, accumulators
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return nll.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not any(map(_will_run, ctx.accumulators)):  # e.g. autograd.grad(segment_nll[k], inputs=embeds)
            return grad, None, None, None, None
        scale = grad.reshape(-1)[0]
        if not bool((grad == scale).all()):
            raise RuntimeError("the fused LM head needs every segment's NLL sum weighted equally in a loss that "
                               "trains the head (e.g. the mean over all targets); set fused_head=False otherwise")
        grads, (weight_dtype, bias_dtype) = ctx.grads, ctx.dtypes
        if grads is None:
            raise RuntimeError("the fused LM head's weight gradient was already handed out (a second backward)")
        ctx.grads = None  # free the float32 buffer now, not when the caller drops the loss
        weight = None if grads.weight is None else (grads.weight * scale).to(weight_dtype)
        bias = None if grads.bias is None else (grads.bias * scale).to(bias_dtype)
        return grad, weight, bias, None, None


def _will_run(node) -> bool:
    """Whether this backward pass reaches ``node`` (false for parameters left out of autograd.grad's inputs)."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)  # what torch's own multi-grad hooks use
    return True if will_execute is None else bool(will_execute(node))


def linear_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, grads: HeadGradients | None,
              per_token: bool) -> tuple[torch.Tensor, ...]:
    """(NLL sum, count[, per-position NLL]) of ``head(hidden)`` [..., d] against ``targets`` [...], float32.

    ``grads`` collects the weight gradient (None: the head's parameters get none); hand it to autograd
    with ``attach_head_gradients`` on the stacked NLL sums of all calls."""

    def forward(hidden: torch.Tensor, targets: torch.Tensor):
        weight, bias = head.weight, head.bias
        learn = grads if torch.is_grad_enabled() and weight.requires_grad else None
        return _ChunkedNLL.apply(hidden.reshape(-1, hidden.shape[-1]), weight.detach(),
                                 None if bias is None else bias.detach(), targets.reshape(-1), learn)

    total, token_nll = _as_forward_of(head, forward, hidden, targets)
    count = (targets != IGNORE_INDEX).sum()
    return (total, count, token_nll.view(targets.shape)) if per_token else (total, count)


def attach_head_gradients(head: nn.Linear, nll: torch.Tensor, grads: HeadGradients) -> torch.Tensor:
    """``nll`` (the stacked NLL sums of this forward's ``linear_cross_entropy`` calls), now also carrying the
    head weight's gradient; a no-op without gradients."""
    if not torch.is_grad_enabled() or grads.weight is None:
        return nll

    def forward(nll: torch.Tensor) -> torch.Tensor:
        params = [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]
        accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in params]
        return _AttachWeightGradient.apply(nll, head.weight, head.bias, grads, accumulators)

    return _as_forward_of(head, forward, nll)
