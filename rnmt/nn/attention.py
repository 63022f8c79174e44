"""Attention over the encoder's memory: Bahdanau's additive score and Luong's global scores.

    e_tj = score(q_t, h_j)             one number per source position j
    a_t  = softmax_j(e_tj)             padded positions masked out
    c_t  = Σ_j a_tj h_j                context vector

Scores (q: query, h: memory row):
    additive (Bahdanau et al. 2015, eq. 6; Luong's `concat`):  vᵀ tanh(W_q q + W_k h)
    dot      (Luong et al. 2015, eq. 8):                      qᵀ h
    general  (Luong et al. 2015, eq. 8):                      qᵀ W_a h

Everything that depends only on the memory (`W_k h`, `W_a h`) is computed once per sentence
by `keys()`, not once per decoder step. A decoder that steps through its target in training
(Bahdanau; Luong with input feeding) attends through `AttentionSteps`, which shares the work
of the steps of one pass on the CPU.

The additive score is computed through the logistic sigmoid: tanh(z) = 2σ(2z) − 1, so

    vᵀ tanh(z) = 2 vᵀσ(2z) − Σ_i v_i

and the constant Σ_i v_i, the same for every source position, cancels in the softmax. The
attention weights are therefore softmax_j(2 vᵀσ(2 W_q q + 2 W_k h_j)): the same numbers up
to rounding, but σ runs about 5× faster than tanh in torch on the CPU, and this
(rows, src_len, attn) activation is the largest elementwise job of a decoder step (about a
third of a beam-search step of the reference model, with tanh). In bf16/fp16 the scores
carry Σ_i v_i / 2 more, rounded with them: on the reference model (Σ_i v_i = −1.1) CPU
bf16 beam 5 scored 21.29 BLEU on Multi30k test_2016, 21.28 with tanh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnmt.nn.linear import Linear
from rnmt.nn.onednn import RecurrentProduct, recurrent_product_dtype
from rnmt.precision import cpu_autocast_off, cpu_training_products

SCORES = ("bahdanau", "dot", "general", "concat")
# Elements of the additive score's (rows, src_len, attn) activation computed at once when
# no gradient is kept: 4 MB in fp32, which stays in the CPU's caches between the sum, the
# sigmoid and the v product.
ADDITIVE_CHUNK = 1 << 20


class Attention(nn.Module):
    """Shapes: query (batch, steps, query_dim) or one step (batch * m, query_dim), m ≥ 1
    rows per memory (beams of one sentence, consecutive); memory (batch, src_len,
    memory_dim); keys = `keys(memory)`, always (it is not W_k h alone: see there); mask
    (batch, src_len), True at real tokens; context (batch, steps, memory_dim) or
    (batch * m, memory_dim); weights likewise with src_len."""

    def __init__(self, score: str, query_dim: int, memory_dim: int, attn_dim: int) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown attention {score!r}; choose from {SCORES}")
        self.score = score
        self.additive = score in ("bahdanau", "concat")
        if self.additive:
            self.query_proj = Linear(query_dim, attn_dim, bias=False)
            self.key_proj = Linear(memory_dim, attn_dim, bias=True)
            self.v = nn.Linear(attn_dim, 1, bias=False)
        elif score == "general":
            self.key_proj = Linear(memory_dim, query_dim, bias=False)
        elif query_dim != memory_dim:
            raise ValueError(
                f"dot attention needs equal query and memory sizes, got {query_dim} and "
                f"{memory_dim}; use general or bahdanau"
            )

    def keys(self, memory: Tensor) -> Tensor:
        """The memory-side part of the score, computed once per sentence, from memory
        (batch, src_len, memory_dim): 2 W_k h (batch, src_len, attn_dim) for the additive
        score (the 2: see the module docstring), W_a h (batch, src_len, query_dim) for
        general, the memory itself for dot."""
        if self.score == "dot":
            return memory
        if self.additive:
            return self.key_proj(memory).mul_(2.0)
        return self.key_proj(memory)

    def queries(self, query: Tensor) -> Tensor:
        """The query side of the additive score, 2 W_q q (doubled like the keys)."""
        return self.query_proj(query).mul_(2.0)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        single = query.dim() == 2
        if single:
            # (batch * m, query_dim) -> (batch, m, query_dim): beam search keeps one copy of
            # each sentence's memory for its m consecutive beams, which attend as m "steps".
            batch = keys.size(0)
            if query.size(0) % batch:
                raise ValueError(f"{query.size(0)} query rows for {batch} memories")
            query = query.view(batch, query.size(0) // batch, -1)
        if self.additive:
            # 2 vᵀσ(2 W_q q + 2 W_k h) (module docstring); keys already hold 2 W_k h.
            scores = self._additive_scores(self.queries(query), keys)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, memory)
        if single:
            return context.flatten(0, 1), weights.flatten(0, 1)
        return context, weights

    def _additive_scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """2 vᵀσ(q_t + k_j) for query (batch, steps, attn) and keys (batch, src_len, attn),
        both already doubled: scores (batch, steps, src_len).

        The (batch, steps, src_len, attn) activation is the largest tensor of a search step
        (33 MB for 64 sentences × 5 beams × 50 pieces): on a CPU without autograd it is
        computed a few sentences at a time (`ADDITIVE_CHUNK`), which bounds the memory and
        keeps the three passes over it in cache. Training keeps every chunk for the
        backward pass anyway, and on a GPU each chunk would cost three more kernel
        launches, so both compute it whole.
        """
        per_sentence = query.size(1) * keys.size(1) * keys.size(2)
        if (torch.is_grad_enabled() or keys.device.type != "cpu"
                or query.size(0) * per_sentence <= ADDITIVE_CHUNK):
            return self._additive_part(query, keys)
        chunk = max(1, ADDITIVE_CHUNK // per_sentence)
        return torch.cat([self._additive_part(q, k)
                          for q, k in zip(query.split(chunk), keys.split(chunk))])

    def _additive_part(self, query: Tensor, keys: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return _AdditiveScores.apply(query, keys, self.v.weight.view(-1))
        # (batch, steps, 1, attn) + (batch, 1, src_len, attn); σ in place: held once.
        hidden = (query.unsqueeze(2) + keys.unsqueeze(1)).sigmoid_()
        return self.v(hidden).squeeze(-1).mul_(2.0)


class _AdditiveScores(torch.autograd.Function):
    """scores = 2 vᵀσ(q_t + k_j) with a hand-written backward (training, except the CPU
    steps of `AttentionSteps`).

    Shapes: query (batch, steps, attn), keys (batch, src_len, attn), v (attn,) -> scores
    (batch, steps, src_len). With z = q_t + k_j and a = σ(z), the only tensor kept is a
    (batch, steps, src_len, attn), and the backward turns it, in place, into

        ∂scores/∂z = 2 v ⊙ a ⊙ (1 - a)     (times the incoming gradient)

    whose sums over src_len and steps are dq and dk; dv = 2 Σ g a is taken first.
    Autograd through the forward's ops would allocate three more tensors of that size per
    step (the v product's gradient, σ's, the broadcast's), the largest of a training step
    of the reference model after the vocabulary's. One backward per forward (it consumes
    what it saved).
    """

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        hidden = (query.unsqueeze(2) + keys.unsqueeze(1)).sigmoid_()
        ctx.save_for_backward(hidden, v)
        return torch.matmul(hidden, v).mul_(2.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        hidden, v = ctx.saved_tensors
        grad = grad * 2.0  # (batch, steps, src_len)
        grad_v = (grad.reshape(1, -1) @ hidden.reshape(-1, hidden.size(-1))).view(-1)
        dz = hidden.addcmul_(hidden, hidden, value=-1.0)  # a - a² = a(1 - a)
        dz.mul_(v).mul_(grad.unsqueeze(-1))
        return dz.sum(2), dz.sum(1), grad_v


class AttentionSteps:
    """Attention at every step of one teacher-forced pass over the same memory: a decoder
    whose query at step t depends on step t-1 (Bahdanau; Luong with input feeding) calls
    it once per step. Shapes: query (batch, query_dim) -> context (batch, memory_dim),
    weights (batch, src_len).

    With the additive score in fp32 CPU training, each step is one `_AdditiveStep`, and
    what the steps share goes through one `_MemoryGradient` node:

    - a step's (batch, src_len, attn) activation a_t = σ(q_t + k_j) is not kept for the
      backward pass: the step's forward computes it into one buffer of the pass, and its
      backward computes it again there from q_t (two more passes over it). Kept, the
      steps' activations took ~245 MB at the reference model's longest Multi30k batch;
      computed again, a step's stays in the CPU's caches between the passes that use it;
    - a step's backward folds v into the sums: with g = ∂L/∂scores (batch, src_len) and
      a' = a ⊙ (1 - a),

          ∂L/∂q_t = 2 v ⊙ Σ_j g_tj a'_tj        (one bmm over the activation)
          ∂L/∂k_j = 2 v ⊙ Σ_t g_tj a'_tj         (summed into one tensor U, v applied once)
          ∂L/∂v   = 2 Σ_t Σ_j g_tj a_tj

      nine passes over activation-sized tensors per step, where `_AdditiveScores` and
      autograd's sums over steps took about twenty;
    - the memory's gradient through the context, Σ_t a_tᵀ ∂L/∂c_t, is one bmm over all
      steps at the end instead of one outer product (a bmm with an inner size of 1) and a
      running sum per step;
    - the query projection 2 W_q q_t of every step is one `RecurrentProduct` for the pass:
      W_q reordered (and in bf16 cast) once, dW_q one product over all steps' rows.
      Measured against `rnmt.nn.linear` per step, in one process over 60 pairs of
      reference-model training batches: 1.005× the speed in fp32, 1.002× in bf16
      (quartiles 0.98–1.04), no faster. (The decoder's recurrent product used it too; it
      now has its own pass, `rnmt.nn.lstm_steps`, which also takes the gates.)

    Under CPU autocast to bf16 (`--precision bf16`) the same steps run in fp32, autocast
    switched off (the query and key products multiply in bf16 and return fp32): what the
    steps do is elementwise work and matrix-vector products, which bf16 would not speed
    up (`rnmt.precision.cpu_training_products`). Anywhere else every step is
    `Attention.forward`. Same numbers up to rounding either way.
    """

    def __init__(self, attention: Attention, keys: Tensor, memory: Tensor, mask: Tensor
                 ) -> None:
        self.attention, self.keys, self.memory, self.mask = attention, keys, memory, mask
        self.fast = attention.additive and cpu_training_products(memory) is not None
        self.query_product: RecurrentProduct | None = None  # 2 W_q q_t, doubled like keys
        if self.fast:
            self._pass = _Pass(keys, memory, mask, attention.v.weight)
            products = recurrent_product_dtype(memory)
            with cpu_autocast_off():
                self._token = _MemoryGradient.apply(keys, memory, attention.v.weight,
                                                    self._pass)
                if products is not None:
                    self.query_product = RecurrentProduct(attention.query_proj.weight * 2.0,
                                                          products)

    def __call__(self, query: Tensor) -> tuple[Tensor, Tensor]:
        if not self.fast:
            return self.attention(query, self.keys, self.memory, self.mask)
        if self.query_product is None:  # oneDNN switched off: `rnmt.nn.linear` per step
            queries = self.attention.queries(query)
        else:
            with cpu_autocast_off():
                queries = self.query_product(query)
        with cpu_autocast_off():
            return _AdditiveStep.apply(queries, self._token, self._pass)


class _Pass:
    """What the steps of one pass share: the doubled keys, the memory, the mask, 2v (the
    score's factor 2 folded in once), the buffer a step's activation (batch, src_len,
    attn) is computed into, and the gradients summed over steps."""

    def __init__(self, keys: Tensor, memory: Tensor, mask: Tensor, v: Tensor) -> None:
        self.keys, self.memory = keys.detach().float(), memory.detach().float()
        self.v2 = v.detach().view(-1) * 2.0
        self.masked = ~mask
        self.activation = torch.empty_like(self.keys)
        self.sum_ga: Tensor | None = None  # U = Σ_t g_t ⊙ a'_t (batch, src_len, attn)
        self.grad_v = self.v2.new_zeros(self.v2.shape)
        self.weights: list[Tensor] = []  # a_t and ∂L/∂c_t of the steps backward reached
        self.grad_context: list[Tensor] = []

    def sigma(self, q: Tensor) -> Tensor:
        """a = σ(q + k_j) for the step's doubled query q (batch, attn), in the buffer."""
        return torch.add(self.keys, q.unsqueeze(1), out=self.activation).sigmoid_()


class _MemoryGradient(torch.autograd.Function):
    """The node through which keys, memory and v reach the steps: forward hands out a
    scalar every step takes as an input, so autograd runs this backward after all the
    steps' backwards, and it returns the gradients they summed."""

    @staticmethod
    def forward(ctx, keys: Tensor, memory: Tensor, v: Tensor, shared: _Pass  # type: ignore[override]
                ) -> Tensor:
        ctx.shared = shared
        return keys.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor):  # type: ignore[override]
        shared: _Pass = ctx.shared
        grad_keys = grad_memory = None
        if shared.sum_ga is not None:
            grad_keys = shared.sum_ga.mul_(shared.v2)
        if shared.weights:
            # Σ_t a_tᵀ ∂L/∂c_t: (batch, src_len, steps) @ (batch, steps, memory_dim)
            grad_memory = torch.bmm(torch.stack(shared.weights, 2),
                                    torch.stack(shared.grad_context, 1))
        grad_v = shared.grad_v.mul_(2.0).view(1, -1)
        shared.weights, shared.grad_context, shared.sum_ga = [], [], None
        return grad_keys, grad_memory, grad_v, None


class _AdditiveStep(torch.autograd.Function):
    """One step: q (batch, attn), the doubled query projection -> context (batch,
    memory_dim), weights (batch, src_len). Backward as in `AttentionSteps`, from the
    step's q and weights: it computes the activation again and turns it into a' in place."""

    @staticmethod
    def forward(ctx, q: Tensor, token: Tensor, shared: _Pass  # type: ignore[override]
                ) -> tuple[Tensor, Tensor]:
        a = shared.sigma(q)
        ctx.shared = shared
        scores = torch.mv(a.view(-1, a.size(-1)), shared.v2).view(a.shape[:2])
        weights = torch.softmax(scores.masked_fill_(shared.masked, float("-inf")), dim=-1)
        context = torch.bmm(weights.unsqueeze(1), shared.memory).squeeze(1)
        ctx.save_for_backward(weights, q)
        ctx.set_materialize_grads(False)
        return context, weights

    @staticmethod
    def backward(ctx, grad_context: Tensor | None, grad_weights: Tensor | None  # type: ignore[override]
                 ):
        weights, q = ctx.saved_tensors
        shared: _Pass = ctx.shared
        grad_w = grad_weights  # ∂L/∂w, from the weights themselves and through the context
        if grad_context is not None:
            grad_context = grad_context.contiguous()
            through_context = torch.bmm(shared.memory, grad_context.unsqueeze(2)).squeeze(2)
            grad_w = through_context if grad_w is None else grad_w + through_context
            shared.weights.append(weights)
            shared.grad_context.append(grad_context)
        if grad_w is None:  # neither output reached the loss
            return None, None, None
        # softmax: ∂L/∂s_j = w_j (∂L/∂w_j - Σ_i w_i ∂L/∂w_i); 0 where masked (w = 0)
        g = weights * (grad_w - (weights * grad_w).sum(-1, keepdim=True))  # (batch, src_len)
        a = shared.sigma(q)  # (batch, src_len, attn), as the forward had it
        shared.grad_v.addmv_(a.view(-1, a.size(-1)).t(), g.view(-1))
        a_prime = a.addcmul_(a, a, value=-1.0)  # a(1 - a), in place
        grad_q = torch.bmm(g.unsqueeze(1), a_prime).squeeze(1).mul_(shared.v2)
        if shared.sum_ga is None:
            shared.sum_ga = a_prime * g.unsqueeze(-1)
        else:
            shared.sum_ga.addcmul_(a_prime, g.unsqueeze(-1))
        return grad_q, grad_q.new_zeros(()), None
