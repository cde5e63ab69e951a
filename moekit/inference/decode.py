"""One decode step without the model's generic forward: the per-token loop of generation.

Decoding one token per sequence reads every active weight once and does little else, so
on a CPU its speed is the memory bandwidth of a handful of matrix-vector products plus
the cost of launching every small op (on a 2-core CPU one op costs as much as reading a
hundred kilobytes of weights: docs/internals.md). :class:`Decoder` runs the same arithmetic as
``Transformer.forward`` with a KV cache and ``S = 1`` in fewer ops: the residual is kept
``[B, d]``; the rotation of queries and keys is one small matmul over both (RoPE written
as a ``[hd, hd]`` matrix, built once per step); the attention output projection adds
into the residual (``addmm``); the top-k router's softmax runs over the k chosen logits
only (equal to softmax-then-renormalise); each chosen expert's down projection adds into
the residual scaled by its router weight (``addmm(alpha=w)``); no routing statistics or
auxiliary losses are built. Batches of more than ``unsorted_max_slots`` (token, expert) pairs
(:data:`moekit.layers.thresholds.THRESHOLDS`) run the MoE layer's own sorted path, which reads each chosen expert's weights once for all
its rows.

At batch 1 in float32 on the CPU, where ``moekit.kernels`` is built, each layer is two
calls into C instead: the attention (norm, q/k/v, RoPE, cache write, attention, output
projection into the residual) and the Mixtral-style MoE feed-forward (norm, top-k router,
each chosen SwiGLU expert added into the residual), and the final norm is folded into the
LM-head product; layers the kernels do not take run as below. Quantised layers
(:mod:`moekit.layers.quantized`) take the same shape of steps in their format
(``LowpAttentionStep``, ``LowpMoETokenStep``); their MoE step takes up to 64 tokens, so
batched decoding reads each chosen expert's codes once a step, and their q/k/v run as one
product and the head over all rows.

It covers the common case and hands the rest to the modules themselves, so every model
decodes: attention with q/k norms or q/k/v clamping runs ``Attention.forward``; routers
other than ``topk`` are called as modules; the chosen experts run as in the MoE layer's
few-token path (:func:`moekit.layers.dispatch.add_chosen_experts`); dense layers, shared experts and MoE layers under another dispatcher
(expert parallelism) run their modules; under ``torch.autocast`` a step is the generic
forward. The generic forward is the reference: tests hold the logits of every configuration
to it.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels
from moekit.layers.dispatch import add_chosen_experts
from moekit.layers.experts import SwiGLUExperts
from moekit.layers.norm import RMSNorm
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.layers.router import TopKRouter
from moekit.layers.thresholds import threshold


def _norm_ok(norm) -> bool:
    """Whether a kernel can fold ``norm`` into the product that reads it: moekit's float32
    RMSNorm on the CPU."""
    w = getattr(norm, "weight", None)
    return isinstance(norm, RMSNorm) and kernels.for_tensors(w) is not None and w.is_contiguous()


def _lowp_parts(name: str, fmt, parts: dict, group_size: int, lead: tuple[int, ...] = ()):
    """A quantised weight's parts (``moekit.layers.quantized``; ``fmt`` its
    :class:`moekit.ops.lowp.WeightFormat`) as the kernels' checked :class:`moekit.kernels.LowpWeights`."""
    return kernels.lowp_weights(name, fmt.name, parts[fmt.parts[0]], parts.get("scale"), group_size, lead)


def _lowp_attention(attn):
    """``(w_qkv, b_qkv, w_o, b_o)`` for :class:`moekit.kernels.LowpAttentionStep` when all four
    projections are quantised in one format and group (the q/k/v rows concatenated: a copy
    for this generation), else ``None``."""
    mods = [attn.wq, attn.wk, attn.wv, attn.wo]
    if not all(isinstance(m, QuantizedLinear) for m in mods) or len({(m.format.name, m.group_size) for m in mods}) > 1:
        return None
    fmt, group = mods[0].format, mods[0].group_size
    qkv = [m.parts() for m in mods[:3]]
    joined = {part: torch.cat([p[part] for p in qkv]) for part in qkv[0]}
    w_qkv = _lowp_parts("w_qkv", fmt, joined, group)
    b_qkv = None
    if any(m.bias is not None for m in mods[:3]):
        b_qkv = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                           for m in mods[:3]])
    b_o = None if attn.wo.bias is None else attn.wo.bias.detach()
    return w_qkv, b_qkv, _lowp_parts("w_o", fmt, attn.wo.parts(), group), b_o


def _lowp_qkv(lib, attn, weights, h: torch.Tensor) -> torch.Tensor:
    """q, k and v of the rows ``h`` in one product over the concatenated quantised projections
    (:func:`_lowp_attention`'s), a module call each beyond the kernel's rows."""
    w, b = weights[0], weights[1]
    if h.shape[0] > kernels.LOWP_MAX_ROWS or h.dtype != torch.float32:
        return torch.cat([attn.wq(h), attn.wk(h), attn.wv(h)], dim=-1)
    out = kernels.rows_lowp(lib, w.fmt, w.codes, w.scale, w.group_size, h.contiguous(), h.new_empty(h.shape[0], w.N))
    return out if b is None else out.add_(b)


def _lowp_out(lib, attn, weights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + wo(y)``, the product added into ``x`` (this step's own residual) by the kernel."""
    w, b = weights[2], weights[3]
    if y.shape[0] > kernels.LOWP_MAX_ROWS or y.dtype != torch.float32 or not x.is_contiguous():
        return x + attn.wo(y)
    kernels.rows_lowp(lib, w.fmt, w.codes, w.scale, w.group_size, y.contiguous(), x, accumulate=True)
    return x if b is None else x.add_(b)


class Decoder:
    """Decode steps of ``model`` (a :class:`moekit.Transformer`) against ``cache``.

    Build one per generation (it reads the weights as they are then, e.g. after
    :func:`moekit.inference.prepare_for_inference`), then call :meth:`step` per token.
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        cfg = model.config
        self.hd = cfg.dim_per_head
        self.H, self.Hkv = cfg.n_heads, cfg.kv_heads
        self.dtype = model.embed.weight.dtype
        half = self.hd // 2
        # RoPE as one matmul per layer: x * cos + rotate_half(x) * sin == x @ R with
        # R = diag(cos) + P diag(sign * sin), P[i, j] = 1 where i = j + hd/2 (mod hd)
        self.sin_sign = torch.cat([-torch.ones(half), torch.ones(self.hd - half)]).to(model.rope.sin)
        self.swap = torch.eye(self.hd).roll(half, dims=0).to(model.rope.sin)
        self.k_cache, self.v_cache = cache.k.unbind(0), cache.v.unbind(0)  # per layer [B, Hkv, max_len, hd]
        # one-row steps run their projections through moekit.kernels where it is built
        # (float32 on the CPU): each norm folded into the product that reads it, each
        # Mixtral-style MoE layer in one call
        self.lib = kernels.for_tensors(model.norm.weight) if _norm_ok(model.norm) else None
        head = model.lm_head
        # the head: a float32 product, a quantised one (moekit.layers.quantized) without bias,
        # each with the final norm folded in; else a module call
        self.head = None
        if self.lib is not None and isinstance(head, nn.Linear) and kernels.rows_ok(head.weight):
            self.head = "float"
        elif self.lib is not None and isinstance(head, QuantizedLinear) and head.bias is None:
            self.head = _lowp_parts("lm_head", head.format, head.parts(), head.group_size)
        self.layers = [self._plan(layer, block) for layer, block in enumerate(model.blocks)]

    def _plan(self, layer, block):
        """This decoder's path choice for one block: which parts run as bound kernel steps,
        which inline in torch ops, which as their modules."""
        attn, ffn = block.attn, block.ffn
        attn_weights = lowp_attn = None  # q/k norms or clamping: the module
        if attn.qk_norm is None and attn.clip_qkv is None and not attn.adapters:  # adapters: the module
            if isinstance(attn.wq, nn.Linear):
                w_qkv, b_qkv = attn.qkv_weights()  # (a copy for this generation when not prepared)
                attn_weights = (w_qkv.t(), b_qkv, attn.wo.weight.t(), attn.wo.bias, attn.sliding_window)
            else:  # quantised projections (moekit.layers.quantized), the rest inline
                lowp_attn = _lowp_attention(attn) if self.lib is not None else None
                if lowp_attn is not None:  # q/k/v in one kernel product, the output added into the residual
                    attn_weights = (partial(_lowp_qkv, self.lib, attn, lowp_attn), None,
                                    partial(_lowp_out, self.lib, attn, lowp_attn), None, attn.sliding_window)
                else:  # a module call each
                    attn_weights = (lambda h, a=attn: torch.cat([a.wq(h), a.wk(h), a.wv(h)], dim=-1), None,
                                    lambda x, y, wo=attn.wo: x + wo(y), None, attn.sliding_window)
        # moe: None runs the ffn module (a dense layer, or an MoE under another dispatcher, as
        # expert parallelism sets); () calls the router as a module; else the top-k router inline
        moe = None
        if block.is_moe and ffn.dispatcher is None and ffn.config.skip_below == 0:  # skipping: the module
            router = ffn.router
            lean_router = type(router) is TopKRouter and {router.gate.weight.dtype, block.ffn_norm.weight.dtype,
                                                           self.dtype} == {torch.float32}
            moe = (router.gate.weight.t(), router.gate.bias, router.renormalize, router.scale) if lean_router else ()
        # one-row steps: this layer's attention and MoE bound to the kernels, where they apply
        k_attn = k_moe = None
        if (self.lib is not None and attn_weights is not None and not callable(attn_weights[0])
                and _norm_ok(block.attn_norm) and self.cache.k.shape[1] == 1):
            w_qkv, b_qkv, w_o, b_o, _ = attn_weights
            heads, k_cache, v_cache = (self.H, self.Hkv, self.hd), self.k_cache[layer][0], self.v_cache[layer][0]
            if kernels.attention_ok(w_qkv.t(), w_o.t(), heads, k_cache, v_cache, b_qkv, b_o):
                norm = block.attn_norm
                k_attn = kernels.AttentionStep(self.lib, norm.weight, norm.eps, w_qkv.t(), b_qkv, heads, k_cache,
                                               v_cache, w_o.t(), b_o)
        elif (lowp_attn is not None and _norm_ok(block.attn_norm) and self.cache.k.shape[1] == 1
              and self.cache.k.dtype == torch.float32):  # quantised projections, all in one format
            norm, (w_qkv, b_qkv, w_o, b_o) = block.attn_norm, lowp_attn
            k_attn = kernels.LowpAttentionStep(self.lib, norm.weight, norm.eps, w_qkv, b_qkv,
                                               (self.H, self.Hkv, self.hd), self.k_cache[layer][0],
                                               self.v_cache[layer][0], w_o, b_o)
        lean_moe = (self.lib is not None and moe and ffn.shared_experts is None and _norm_ok(block.ffn_norm)
                    and not getattr(ffn.experts, "adapters", None))
        if (lean_moe and type(ffn.experts) is SwiGLUExperts
                and kernels.moe_token_ok(block.ffn_norm.weight, ffn.router.gate.weight, ffn.router.gate.bias,
                                         *ffn.experts.weights())):
            norm, gate = block.ffn_norm, ffn.router.gate
            k_moe = kernels.MoETokenStep(self.lib, norm.weight, norm.eps, gate.weight, gate.bias, ffn.config.top_k,
                                         moe[2], moe[3], *ffn.experts.weights())
        elif lean_moe and type(ffn.experts) is QuantizedExperts and ffn.experts.d_out == ffn.experts.d_model:
            ex, norm, gate = ffn.experts, block.ffn_norm, ffn.router.gate
            w1, w3, w2 = (_lowp_parts(name, ex.format, ex.parts(name), ex.group_size, lead=(ex.num_experts,))
                          for name in ("w1", "w3", "w2"))
            k_moe = kernels.LowpMoETokenStep(self.lib, norm.weight, norm.eps, gate.weight, gate.bias,
                                             ffn.config.top_k, moe[2], moe[3], w1, w3, w2)
        return block, attn_weights, moe, k_attn, k_moe

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence; returns the next-token logits ``[B, vocab]``.

        Args:
            tokens: ``[B]`` ids, each continuing its cached sequence.
            positions: ``[B]`` RoPE position of each token (left-padded batches); default
                ``cache.length`` for all.
            key_mask: ``[B, cache.length + 1]`` bool, False where a key is padding.
        """
        model, cache = self.model, self.cache
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError(f"KV cache is full: {pos + 1} tokens needed, it holds {cache.max_len}")
        if torch.is_autocast_enabled(tokens.device.type):  # its casts reach the modules' ops only
            pos_b = None if positions is None else positions[:, None]
            return model(tokens[:, None], kv_cache=cache, positions=pos_b, key_mask=key_mask).logits[:, -1]
        if positions is None:
            if pos >= model.rope.max_seq_len:
                model.rope(torch.tensor([pos]))  # raises its error
            cos_t, sin_t = model.rope.cos[pos : pos + 1], model.rope.sin[pos : pos + 1]  # [1, hd]
        else:
            cos_t, sin_t = model.rope(positions)  # [B, hd]
        rotation = None  # built when a layer's attention runs in torch ops
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, L] -> [B, 1, 1, L]
        x = F.embedding(tokens, model.embed.weight)  # [B, d]
        lib = self.lib if x.shape[0] == 1 else None
        for layer, (block, attn_w, moe, k_attn, k_moe) in enumerate(self.layers):
            if lib is not None and k_attn is not None and mask is None:  # norm, q/k/v, RoPE, cache, attention, out
                window = attn_w[4]
                k_attn(x[0], cos_t[0], sin_t[0], pos, 0 if window is None else max(0, pos + 1 - window))
            else:
                h = block.attn_norm(x)
                if attn_w is None:
                    y = block.attn(h[:, None], cos_t if positions is None else cos_t[:, None],
                                   sin_t if positions is None else sin_t[:, None], cache, layer, key_mask)[:, 0]
                    x = x + y
                else:
                    if rotation is None:
                        rotation = torch.diag_embed(cos_t) + self.swap * (sin_t * self.sin_sign)[:, None, :]  # [B or 1, hd, hd]
                    x = self._attention(x, h, attn_w, rotation, layer, pos, mask)
            if k_moe is not None and x.shape[0] <= k_moe.max_rows:  # norm, router, experts: one call adding into x
                k_moe(x)  # (this step's own tensor)
                continue
            h = block.ffn_norm(x)
            if moe is None:
                y = block.ffn(h, token_ids=tokens).output if block.is_moe else block.ffn(h)
                x = x + y
            else:
                x = self._moe(x, h, block.ffn, moe, tokens)
        cache.advance(1)
        head, B = model.lm_head, x.shape[0]
        if self.head == "float" and B == 1:
            logits = x.new_empty(1, head.out_features)
            kernels.rows(self.lib, head.weight, x[0], logits[0], bias=head.bias, norm_weight=model.norm.weight,
                         eps=model.norm.eps)
            return logits
        if self.head not in (None, "float") and B <= kernels.LOWP_MAX_ROWS:  # a quantised head, rows at once
            w = self.head
            return kernels.rows_lowp(self.lib, w.fmt, w.codes, w.scale, w.group_size, x.contiguous(),
                                     x.new_empty(B, head.out_features), norm_weight=model.norm.weight,
                                     eps=model.norm.eps)
        return model.lm_head(model.norm(x))

    def _attention(self, x, h, weights, rotation, layer, pos, mask):
        w_qkv, b_qkv, w_o, b_o, window = weights
        B, H, Hkv, hd = x.shape[0], self.H, self.Hkv, self.hd
        if callable(w_qkv):  # quantised projections
            qkv = w_qkv(h)
        else:
            qkv = torch.mm(h, w_qkv) if b_qkv is None else torch.addmm(b_qkv, h, w_qkv)  # [B, (H+2Hkv) hd]
        qk = qkv[:, : (H + Hkv) * hd].view(B, H + Hkv, hd)
        if qk.dtype == rotation.dtype:
            qk = torch.matmul(qk, rotation)  # RoPE on q and k at once
        else:  # in float32, as the model's forward
            qk = torch.matmul(qk.float(), rotation).to(qk.dtype)
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache.select(2, pos).copy_(qk[:, H:])
        v_cache.select(2, pos).copy_(qkv[:, (H + Hkv) * hd :].view(B, Hkv, hd))
        start = 0 if window is None else max(0, pos + 1 - window)
        keys, values = k_cache[:, :, start : pos + 1], v_cache[:, :, start : pos + 1]
        if mask is not None:
            mask = mask[..., start:]
        y = F.scaled_dot_product_attention(qk[:, :H, None], keys, values, attn_mask=mask, enable_gqa=H != Hkv)
        y = y.reshape(B, H * hd)  # [B, H, 1, hd] -> [B, H*hd]
        if callable(w_o):
            return w_o(x, y)
        return torch.addmm(x, y, w_o) if b_o is None else torch.addmm(x + b_o, y, w_o)

    def _moe(self, x, h, moe_module, moe, tokens):
        if x.shape[0] * moe_module.config.top_k > threshold("unsorted_max_slots"):
            # more rows than the slot loop pays for: the layer sorts them by expert, so each
            # chosen expert's weights are read once for all its rows
            return x + moe_module(h, token_ids=tokens).output
        if moe:  # the top-k router, inline
            w_router, b_router, renormalize, scale = moe
            logits = torch.mm(h, w_router) if b_router is None else torch.addmm(b_router, h, w_router)  # [B, E]
            k = moe_module.config.top_k
            if renormalize:  # softmax over the chosen logits == softmax, top-k, renormalise
                top, idx = torch.topk(logits, k, dim=-1)
                weights = torch.softmax(top, dim=-1)
            else:
                weights, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        else:  # any other router, as a module (its weights already scaled)
            routing = moe_module.router(h, token_ids=tokens)
            weights, idx, scale = routing.weights, routing.indices, 1.0
        if moe_module.shared_experts is not None:
            x = x + moe_module.shared_experts(h)
        # x is this step's own tensor (every layer makes a new one): the experts add into it
        add_chosen_experts(h, moe_module.experts, idx.tolist(), weights.tolist(), x, scale)
        return x

