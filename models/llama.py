"""Llama-family decoder in ``tvm.relax.frontend.nn`` (Llama 2/3/3.1/3.2, SmolLM2, Qwen2).

Parameter names equal the Hugging Face names. Attention is delegated to a policy object
(``models/attention``), so the model code never changes with the policy. The KV cache is a tensor
the runtime owns: ``kv[num_layers, 2, n_kv, capacity, head_dim]``, keys stored without RoPE.
"""

from __future__ import annotations

import dataclasses

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tsedge.tir_kernels import cache_ops, sampling

from .config import ModelConfig
from .linear import QuantEmbedding, make_linear
from .quantization import ROLES, QuantScheme
from .collectives import allgather, allreduce_add

# Decode on CUDA: the fused gate/up projection through ``tir_kernels.gemv`` with the post-attention
# RMSNorm in its prologue (on), or a norm kernel and dlight's GEMV (off). On the H200, Llama-3-8B
# dense decode 4.31 vs 4.39 ms at depth 0 and 4.54 vs 4.66 at 4K, means of three alternating runs
# (bench/results/gate_up_gemv_ab_h200.json). Read when a model is constructed.
GATE_UP_NORM_GEMV = True


@dataclasses.dataclass
class Step:
    """What one forward step's attention needs; policies replace ``kv``/``state`` entries with
    the results of their in-place kernels."""

    kv: nn.Tensor
    rope: nn.Tensor
    past: object  # int64 shape variable: tokens cached before this step
    n: object  # tokens in this step
    length: nn.Tensor  # int32 [1] on the device: past + n (kernels that must not change per step read it)
    state: list  # policy state tensors (e.g. the selection cache), in ``state_specs`` order
    select: bool = False  # the context exceeds the policy's budget: attend to a selection
    rows: nn.Tensor | None = None  # per-step attended rows shared by all layers (dense)

    @property
    def one_query(self) -> bool:
        """A decode step (one new token)."""
        return isinstance(self.n, int) and self.n == 1


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, in_out: bool, target, quant: QuantScheme | None,
                 shards: int = 1):
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.shards = shards
        self.qkv_proj = make_linear(quant, cfg.hidden_size, (h + 2 * hkv) * d, cfg.qkv_bias, dtype, in_out, target)
        self.o_proj = make_linear(quant, h * d, cfg.hidden_size, False, dtype, in_out, target)
        self.shape = (h, hkv, d)

    def forward(self, x, layer_id, policy, step, residual, norm: nn.RMSNorm | None = None):
        """``residual + attention(x)``; with ``norm``, ``residual + attention(norm(x))``, the norm
        computed in the QKV GEMV's prologue (decode, where ``qkv_proj.gemv_applies``)."""
        n = x.shape[0]
        h, hkv, d = self.shape
        qkv = self.qkv_proj(x) if norm is None else self.qkv_proj.decode_gemv(x, norm=norm)
        qkv = op.reshape(qkv, [n, h + 2 * hkv, d])  # heads: q, then k, then v
        out = op.reshape(policy.attend(layer_id, qkv, step), [n, h * d])
        if self.shards > 1:  # the shards' partial outputs summed, and the residual
            return allreduce_add(self.o_proj(out), residual)
        return self.o_proj(out, residual)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, in_out: bool, target, quant: QuantScheme | None,
                 shards: int = 1):
        self.shards = shards
        self.gate_up_proj = make_linear(quant, cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype, in_out,
                                        target, decode_gemv=GATE_UP_NORM_GEMV)
        self.intermediate = cfg.intermediate_size
        self.down_proj = make_linear(quant, cfg.intermediate_size, cfg.hidden_size, False, dtype, in_out, target)

    def forward(self, x: nn.Tensor, residual: nn.Tensor, norm: nn.RMSNorm | None = None) -> nn.Tensor:
        """``residual + down(silu(gate(x)) * up(x))``; with ``norm``, of ``norm(x)``, the norm
        computed in the gate/up GEMV's prologue (decode, where ``gate_up_proj.gemv_applies``)."""
        gate_up = self.gate_up_proj(x) if norm is None else self.gate_up_proj.decode_gemv(x, norm=norm)
        fused = None if self.shards > 1 else residual  # sharded: the residual follows the all-reduce
        if self.down_proj.gemv_applies(x):  # decode: SwiGLU in the down GEMV's prologue
            y = self.down_proj.decode_gemv(gate_up, fused, swiglu=True)
        else:
            gate, up = op.split(gate_up, [self.intermediate], axis=-1)
            y = self.down_proj(op.silu(gate) * up, fused)
        return allreduce_add(y, residual) if self.shards > 1 else y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, in_out: bool, target, quant: QuantScheme | None,
                 shards: int = 1):
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.self_attn = Attention(cfg, dtype, in_out, target, quant, shards)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.mlp = MLP(cfg, dtype, in_out, target, quant, shards)

    def forward(self, x, layer_id, policy, step):
        # a decode step on CUDA: a norm is the prologue of the GEMV that reads its output, where
        # that GEMV is ``tir_kernels.gemv``'s (always QKV; gate/up with GATE_UP_NORM_GEMV)
        if self.self_attn.qkv_proj.gemv_applies(x):
            x = self.self_attn(x, layer_id, policy, step, residual=x, norm=self.input_layernorm)
        else:
            x = self.self_attn(self.input_layernorm(x), layer_id, policy, step, residual=x)
        if self.mlp.gate_up_proj.gemv_applies(x):
            return self.mlp(x, residual=x, norm=self.post_attention_layernorm)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: str, in_out: bool, target, quant: dict[str, QuantScheme | None],
                 shards: int = 1):
        embedding = quant["embedding"]
        self.embed_tokens = (nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype) if embedding is None
                             else QuantEmbedding(embedding, cfg.vocab_size, cfg.hidden_size, dtype))
        self.layers = nn.ModuleList([DecoderLayer(cfg, dtype, in_out, target, quant["linear"], shards)
                                     for _ in range(cfg.num_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)


class LlamaForCausalLM(nn.Module):
    """Exports ``prefill``, ``decode`` and ``rope_table`` (see DESIGN.md, runtime contract),
    ``sample`` (the next token picked on the device; CUDA and CPU targets), and
    for selecting policies ``prefill_select``/``decode_select``, which the runtime calls once
    the context exceeds the policy's budget.

    ``in_out`` stores linear weights [in, out] (CPU schedules vectorise over the output dim);
    the lm_head then is a parameter of its own even for tied embeddings. ``quant``: the scheme of
    each role (``models/quantization.py`` ROLES; None: float; default all float): the linears, the
    embedding table (a lookup dequantizes only the rows it gathers) and the lm_head read
    group-quantized weights.

    ``shards > 1``: one tensor-parallel shard (``models/tensor_parallel.py``): ``cfg`` is the
    shard's (``shard_config``), the policy built for it, and o_proj/down_proj outputs all-reduced;
    ``vocab_split``: the shard's lm_head has ``vocab_size / shards`` rows (a tied one its own copy
    of those embedding rows) and the shards' logits are all-gathered.
    """

    def __init__(self, cfg: ModelConfig, policy, dtype: str, in_out: bool,
                 quant: dict[str, QuantScheme | None] | None = None, shards: int = 1, vocab_split: bool = False):
        quant = quant or dict.fromkeys(ROLES)
        self.cfg = cfg
        self.policy = policy
        self.dtype = dtype
        self.model = LlamaModel(cfg, dtype, in_out, policy.target, quant, shards)
        self.shards = shards if vocab_split else 1  # the lm_head's
        self.untied_head = in_out or not cfg.tie_embeddings or vocab_split
        if self.untied_head:  # one row: dlight's GEMV (float weights: at the copy bandwidth), tir_kernels.gemv (q4)
            self.lm_head = make_linear(quant["lm_head"], cfg.hidden_size, cfg.vocab_size // self.shards, False, dtype,
                                       in_out, policy.target if quant["lm_head"] is not None else None)
        self.rope_kernel = cache_ops.make_rope_table(cfg.head_dim, policy.target)
        self.last_row_kernel = cache_ops.make_last_row(cfg.hidden_size, dtype, policy.target)
        self.inv_freq = cfg.inv_freq()
        # device sampling (``sample``) where its single-block kernel builds: CUDA and CPUs
        self.sample_kernel = (sampling.make_sample(cfg.vocab_size, policy.target)
                              if policy.target.kind.name in ("cuda", "llvm") else None)

    def _embed(self, ids: nn.Tensor) -> nn.Tensor:
        """Embedding rows of ``ids`` [n] -> [n, hidden]; "clip" mode, so an id outside the table
        never reads outside it (TVM's default "fast" take does, and warns at every compile)."""
        if isinstance(self.model.embed_tokens, QuantEmbedding):
            return self.model.embed_tokens.lookup(ids)
        table = self.model.embed_tokens.weight
        return op.wrap_nested(relax.op.take(table._expr, ids._expr, axis=0, mode="clip"), name="embed")

    def _forward(self, ids: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, past, length: nn.Tensor, state,
                 select=False):
        x = self._embed(ids)
        step = Step(kv, rope, past, ids.shape[0], length, list(state), select)
        self.policy.begin_step(step)
        for layer_id, layer in enumerate(self.model.layers):
            x = layer(x, layer_id, self.policy, step)
        return self._logits(x), step.kv, tuple(step.state)

    def prefill(self, ids: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, past, length: nn.Tensor, state):
        """One chunk of ``n`` tokens after ``past`` cached ones -> (last logits, kv, state).
        ``length`` int32 [1] on the device holds ``past + n``."""
        return self._forward(ids, kv, rope, past, length, state)

    def decode(self, ids: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, past, length: nn.Tensor, state):
        """One token after ``past`` cached ones -> (logits, kv, state). ``length`` int32 [1] on
        the device holds ``past + 1``; on GPUs no kernel reads ``past``, so every step launches
        the same kernels with the same arguments (one CUDA graph, ``compile/pipeline.py``)."""
        return self._forward(ids, kv, rope, past, length, state)

    def prefill_select(self, ids: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, past, length: nn.Tensor, state):
        """``prefill`` for a context over the policy's budget: attend to selected tokens."""
        return self._forward(ids, kv, rope, past, length, state, select=True)

    def decode_select(self, ids: nn.Tensor, kv: nn.Tensor, rope: nn.Tensor, past, length: nn.Tensor, state):
        """``decode`` for a context over the policy's budget: attend to selected tokens."""
        return self._forward(ids, kv, rope, past, length, state, select=True)

    def _logits(self, x: nn.Tensor) -> nn.Tensor:
        last = op.tensor_ir_op(self.last_row_kernel, "last_row", args=[x],
                               out=nn.Tensor.placeholder([1, self.cfg.hidden_size], self.dtype))
        h = self.model.norm(last)
        if self.untied_head:
            logits = self.lm_head(h)
            if self.shards > 1:  # each shard's rows of the vocabulary, in rank order
                logits = op.reshape(allgather(logits, self.shards), [1, self.cfg.vocab_size])
        else:
            table = self.model.embed_tokens
            logits = op.matmul(h, op.permute_dims(table.weight() if isinstance(table, QuantEmbedding) else table.weight))
        return logits.astype("float32")

    def code_keys(self, kv: nn.Tensor, length: nn.Tensor, state, n):
        """``--score-keys int8``: every layer's key rows ``[length - n, length)`` coded again from
        the KV cache (a cache filled without prefill, ``Engine.fill_random``) -> the policy state."""
        state = list(state)
        for layer_id in range(self.cfg.num_layers):
            state = self.policy.code_keys(kv, state, layer_id, length, n)
        return tuple(state)

    def rope_table(self, num_pos):
        inv = nn.Tensor.from_const(self.inv_freq)
        return op.tensor_ir_op(self.rope_kernel, "compute_rope_table", args=[inv, num_pos],
                               out=nn.Tensor.placeholder([num_pos, self.cfg.head_dim], "float32"))

    def sample(self, logits: nn.Tensor, params: nn.Tensor, counts: nn.Tensor, recent: nn.Tensor,
               token: nn.Tensor, workspace: nn.Tensor):
        """The next token from ``logits`` [1, vocab] float32 on the device -> (token, counts,
        recent, workspace), all updated in place: ``token`` [1] int32 gets the id (the next decode
        step's input). ``params`` [8] float32, ``counts`` [2, vocab] int32 and ``recent`` [R + 1]
        int32 are laid out as ``tir_kernels/sampling.py make_sample`` documents; the semantics
        are ``tsedge/sampling.py``'s."""
        args = [logits, params, counts, recent, token, workspace]
        counts, recent, token, workspace = op.tensor_ir_inplace_op(
            self.sample_kernel, "sample_token", args=args, inplace_indices=[2, 3, 4, 5],
            out=[nn.Tensor.placeholder(list(t.shape), t.dtype) for t in args[2:]])
        return token, counts, recent, workspace

    def get_default_spec(self):
        cfg = self.cfg
        kv = nn.spec.Tensor([cfg.num_layers, 2, cfg.num_kv_heads, "capacity", cfg.head_dim], self.policy.kv_dtype)
        rope = nn.spec.Tensor(["num_pos", cfg.head_dim], "float32")
        state = [nn.spec.Tensor(shape, dtype) for _, shape, dtype in self.policy.state_specs()]
        mode = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        length = nn.spec.Tensor([1], "int32")
        step = {"kv": kv, "rope": rope, "past": int, "length": length, "state": state, **mode}
        functions = {
            "prefill": {"ids": nn.spec.Tensor(["n"], "int32"), **step},
            "decode": {"ids": nn.spec.Tensor([1], "int32"), **step},
            "rope_table": {"num_pos": int, **mode},
        }
        if self.sample_kernel is not None:
            vocab = cfg.vocab_size
            functions["sample"] = {"logits": nn.spec.Tensor([1, vocab], "float32"),
                                   "params": nn.spec.Tensor([sampling.PARAMS], "float32"),
                                   "counts": nn.spec.Tensor([2, vocab], "int32"),
                                   "recent": nn.spec.Tensor(["ring"], "int32"),
                                   "token": nn.spec.Tensor([1], "int32"),
                                   "workspace": nn.spec.Tensor([vocab], "float32"),
                                   "$": {"param_mode": "none", "effect_mode": "none"}}  # no weights
        if getattr(self.policy, "key_codes", None) is not None:
            functions["code_keys"] = {"kv": kv, "length": length, "state": state, "n": int,
                                      "$": {"param_mode": "none", "effect_mode": "none"}}
        if self.policy.selects:
            functions["prefill_select"] = dict(functions["prefill"])  # from_raw pops "$"
            functions["decode_select"] = dict(functions["decode"])
        return nn.spec.ModuleSpec.from_raw(functions, self)
