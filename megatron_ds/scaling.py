"""The paper's scaling laws (DeepSeek LLM, section 3): model scale, compute, optimal hyperparameters
and the optimal split of a compute budget between model and data.

Model scale is M, non-embedding FLOPs per token, not a parameter count:

    M   = 72 n_layer d^2 + 12 n_layer d l_seq         (attention's l_seq term included)
    6N1 = 72 n_layer d^2                              (non-embedding parameters x 6)
    6N2 = 6N1 + 6 n_vocab d                           (plus the embedding)
    C   = M * D                                       (D = training tokens)

Eq. 1 (hyperparameters):   eta_opt = 0.3118 C^-0.1250,   B_opt = 0.2920 C^0.3271 tokens
Eq. 4 (allocation):        M_opt   = 0.1715 C^0.5243,    D_opt = 5.8316 C^0.4757

The coefficients depend on the data (the model-share exponent moved from 0.450 to 0.524 to 0.578
with data quality), so they live in ``ScalingCoefficients`` and can be refitted with
``fit_isoflop`` from runs of your own.

``model_scale_of`` computes M from a real architecture (its actual FFN width, GQA K/V sizes): that
is the M the paper's 7B/67B checks use (4.247e10 and 4.327e11 FLOPs/token), slightly off the
72 n d^2 idealization (which assumes an FFN of exactly 8/3 d and multi-head attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


def model_scale(n_layer: int, d_model: int, l_seq: int = 4096) -> float:
    """M: non-embedding FLOPs per token, 72 n d^2 + 12 n d l_seq."""
    return 72.0 * n_layer * d_model**2 + 12.0 * n_layer * d_model * l_seq


def six_n1(n_layer: int, d_model: int) -> float:
    """6 x non-embedding parameters of the idealized decoder: 72 n d^2."""
    return 72.0 * n_layer * d_model**2


def six_n2(n_layer: int, d_model: int, n_vocab: int = 102400) -> float:
    """6 x all parameters (one embedding matrix counted, as in the paper): 6N1 + 6 n_vocab d."""
    return six_n1(n_layer, d_model) + 6.0 * n_vocab * d_model


def model_scale_of(config, l_seq: Optional[int] = None) -> float:
    """M from a real architecture (a ``ModelConfig``): 6 x its GEMM weights per layer + attention.

    Per layer: q and o are d x (heads*head_dim), k and v d x (kv_heads*head_dim), gate/up/down
    d x ffn; each weight costs 6 FLOPs per token (forward 2, backward 4). Attention scores and
    values cost 12 d l_seq per layer (causal masking not discounted, as in the paper). Norm weights
    are not GEMMs and are left out.
    """
    c = config
    l_seq = l_seq if l_seq is not None else c.max_position_embeddings
    h, hd = c.hidden_size, c.head_dim
    attn = 2 * h * c.num_attention_heads * hd + 2 * h * c.num_kv_heads * hd
    mlp = 3 * h * c.ffn_hidden_size
    return c.num_layers * (6.0 * (attn + mlp) + 12.0 * h * l_seq)


def compute(m: float, tokens: float) -> float:
    """C = M * D, in FLOPs."""
    return m * tokens


@dataclass
class ScalingCoefficients:
    """Power laws y = coef * C^exp; defaults are the paper's fits on its current data."""

    lr_coef: float = 0.3118
    """Eq. 1: eta_opt = lr_coef * C^lr_exp."""
    lr_exp: float = -0.1250
    batch_coef: float = 0.2920
    """Eq. 1: B_opt (tokens) = batch_coef * C^batch_exp."""
    batch_exp: float = 0.3271
    model_coef: float = 0.1715
    """Eq. 4: M_opt = model_coef * C^model_exp (the paper's a)."""
    model_exp: float = 0.5243
    data_coef: float = 5.8316
    """Eq. 4: D_opt = data_coef * C^data_exp (the paper's b = 1 - a)."""
    data_exp: float = 0.4757


PAPER = ScalingCoefficients()


def optimal_lr(c: float, k: ScalingCoefficients = PAPER) -> float:
    return k.lr_coef * c**k.lr_exp


def optimal_batch_tokens(c: float, k: ScalingCoefficients = PAPER) -> float:
    return k.batch_coef * c**k.batch_exp


def optimal_model_scale(c: float, k: ScalingCoefficients = PAPER) -> float:
    return k.model_coef * c**k.model_exp


def optimal_tokens(c: float, k: ScalingCoefficients = PAPER) -> float:
    return k.data_coef * c**k.data_exp


# ---------------------------------------------------------------------------------------------
# Proposals: from a budget (or a model and a token count) to a runnable configuration.


@dataclass
class Proposal:
    """A model shape, batch size, LR and multi-step schedule for one compute budget."""

    compute: float
    model_scale: float
    """M of the proposed shape (real FFN width and heads), FLOPs/token."""
    tokens: float
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    seq_length: int
    lr: float
    batch_tokens: float
    """B_opt from Eq. 1 (before rounding to whole sequences)."""
    global_batch_size: int
    """Sequences per step: B_opt / seq_length, rounded, at least 1."""
    train_iters: int
    lr_warmup_iters: int
    milestones: tuple[int, ...] = field(default_factory=tuple)
    """Steps at which the multi-step schedule drops (80% and 90% of train_iters by default)."""
    factors: tuple[float, ...] = (0.316, 0.1)
    model: Optional[object] = None
    """The whole architecture (a ``ModelConfig``: KV heads, positions, vocabulary too); None: built from the
    shape fields above with ModelConfig's defaults for the rest."""
    preset: Optional[str] = None
    """The --model preset ``model`` is (with ``model``'s differences from it, if any), or None."""
    milestone_fractions: tuple[float, ...] = (0.8, 0.9)
    """``milestones`` as fractions of training, the form --lr-decay-milestones takes."""

    def model_config(self):
        """The proposed architecture as a ModelConfig."""
        if self.model is not None:
            return self.model
        from megatron_ds.config import ModelConfig

        return ModelConfig(num_layers=self.num_layers, hidden_size=self.hidden_size,
                           ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
                           num_query_groups=self.num_attention_heads, max_position_embeddings=self.seq_length)

    def model_flags(self) -> list[str]:
        """Flags that build exactly ``model_config()`` whatever --model defaults to: ``--model PRESET`` plus
        what differs from it, or every field a preset sets (and any other that is not ModelConfig's default)."""
        import dataclasses

        from megatron_ds.config import PRESETS, ModelConfig, model_preset

        m = self.model_config()
        if self.preset is not None:
            out, base = ["--model", self.preset], model_preset(self.preset)
            always = ()
        else:
            out, base = [], ModelConfig()
            always = tuple(PRESETS["tiny"])  # the fields the default --model (tiny) would set
        for f in dataclasses.fields(ModelConfig):
            v = getattr(m, f.name)
            if f.name == "num_query_groups" and v is None:
                v = m.num_attention_heads  # None means multi-head, which a preset's value would override
            if v is not None and (f.name in always or v != getattr(base, f.name)):
                out += ["--" + f.name.replace("_", "-"), repr(v) if isinstance(v, float) else str(v)]
        return out

    def flags(self) -> list[str]:
        """The megatron_ds.pretrain flags for this proposal: the whole architecture, batch, LR and schedule.
        --micro-batch-size 1, the one size that divides any Eq. 1 batch; a larger one, or DP > 1, needs a
        --global-batch-size that is a multiple of micro-batch x DP (round it)."""
        return self.model_flags() + [
            "--seq-length", str(self.seq_length), "--micro-batch-size", "1",
            "--global-batch-size", str(self.global_batch_size),
            "--train-iters", str(self.train_iters), "--lr", f"{self.lr:.3g}",
            "--lr-warmup-iters", str(self.lr_warmup_iters), "--lr-decay-style", "multistep",
            "--lr-decay-milestones", ",".join(f"{x:g}" for x in self.milestone_fractions),
            "--lr-decay-factors", ",".join(f"{x:g}" for x in self.factors)]


def ffn_size(d_model: int, multiple: int = 256) -> int:
    """SwiGLU width: 8/3 d rounded up to a multiple of 256 (4096 -> 11008 after DeepSeek's rounding
    gives 10923 -> 11008)."""
    return int(math.ceil(8 * d_model / 3 / multiple) * multiple)


def _widths() -> list[int]:
    """Candidate d_model: multiples of 64 to 1024, of 256 to 4096, of 1024 beyond, so that heads of
    64 (small) or 128 divide it and large models keep a head count divisible by TP 8."""
    return list(range(64, 1024, 64)) + list(range(1024, 4096, 256)) + list(range(4096, 65536 + 1, 1024))


def head_dim_for(d_model: int) -> int:
    return 128 if d_model >= 1024 else 64


def shape_for_model_scale(target_m: float, l_seq: int = 4096, aspect: float = 100.0) -> tuple[int, int]:
    """(n_layer, d_model) whose M is closest to ``target_m`` near d / n_layer = ``aspect``.

    DeepSeek's shapes run from d/n = 43 (small) to 137 (7B) and 86 (67B); 100 is in between.
    """
    best, best_err = (1, 64), math.inf
    for d in _widths():
        per_layer = 72.0 * d * d + 12.0 * d * l_seq
        n = max(1, round(target_m / per_layer))
        # Miss in M first (log scale), then distance from the aspect ratio as a tie-breaker.
        err = abs(math.log(n * per_layer / target_m)) + 0.05 * abs(math.log((d / n) / aspect))
        if err < best_err:
            best, best_err = (n, d), err
    return best


def propose(compute_budget: Optional[float] = None, *, model_config=None, tokens: Optional[float] = None,
            seq_length: int = 4096, coefficients: ScalingCoefficients = PAPER, warmup_iters: int = 2000,
            milestones: Sequence[float] = (0.8, 0.9), factors: Sequence[float] = (0.316, 0.1),
            aspect: float = 100.0, preset: Optional[str] = None) -> Proposal:
    """Eq. 4 then Eq. 1 for a budget; or, given a model (ModelConfig, the --model ``preset`` when it is
    one) and tokens, Eq. 1 for C = M*D."""
    import dataclasses

    from megatron_ds.config import ModelConfig

    k = coefficients
    if model_config is not None:
        if tokens is None:
            raise ValueError("a model needs a token count (--tokens) to make a compute budget")
        # The run needs rotary tables of seq_length positions: the one change a longer sequence makes.
        model_config = dataclasses.replace(
            model_config, max_position_embeddings=max(model_config.max_position_embeddings, seq_length))
        m = model_scale_of(model_config, seq_length)
        c = compute(m, tokens)
        n, d, ffn = model_config.num_layers, model_config.hidden_size, model_config.ffn_hidden_size
        heads = model_config.num_attention_heads
    else:
        if compute_budget is None:
            raise ValueError("give a compute budget, or a model and a token count")
        c = compute_budget
        n, d = shape_for_model_scale(optimal_model_scale(c, k), seq_length, aspect)
        ffn = ffn_size(d)
        heads = d // head_dim_for(d)
        preset = None  # a shape of its own
        model_config = ModelConfig(num_layers=n, hidden_size=d, ffn_hidden_size=ffn, num_attention_heads=heads,
                                   num_query_groups=heads, max_position_embeddings=seq_length)
        m = model_scale_of(model_config, seq_length)
        tokens = c / m  # spend the whole budget on this shape
    batch_tokens = optimal_batch_tokens(c, k)
    gbs = max(1, round(batch_tokens / seq_length))
    iters = max(1, math.ceil(tokens / (gbs * seq_length)))
    warmup = min(warmup_iters, max(0, iters // 10))  # never more than a tenth of a short run
    return Proposal(compute=c, model_scale=m, tokens=tokens, num_layers=n, hidden_size=d, ffn_hidden_size=ffn,
                    num_attention_heads=heads, seq_length=seq_length, lr=optimal_lr(c, k), batch_tokens=batch_tokens,
                    global_batch_size=gbs, train_iters=iters, lr_warmup_iters=warmup,
                    milestones=tuple(int(round(f * iters)) for f in milestones), factors=tuple(factors),
                    model=model_config, preset=preset, milestone_fractions=tuple(milestones))


# ---------------------------------------------------------------------------------------------
# IsoFLOP fits (the paper's Figure 4 method).


@dataclass
class IsoFlopFit:
    """Per-budget optima and the power laws through them."""

    budgets: np.ndarray
    """Compute budgets, ascending."""
    m_opt: np.ndarray
    """Loss-minimizing M at each budget (vertex of a parabola in log M)."""
    d_opt: np.ndarray
    """C / m_opt."""
    loss_opt: np.ndarray
    """Fitted minimum loss at each budget."""
    parabolas: list
    """Per budget, the coefficients (a2, a1, a0) of loss = a2 x^2 + a1 x + a0 with x = ln M."""
    model_coef: float
    model_exp: float
    data_coef: float
    data_exp: float

    def coefficients(self, base: ScalingCoefficients = PAPER) -> ScalingCoefficients:
        """``base`` with Eq. 4 replaced by this fit."""
        return ScalingCoefficients(base.lr_coef, base.lr_exp, base.batch_coef, base.batch_exp,
                                   self.model_coef, self.model_exp, self.data_coef, self.data_exp)


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(coef, exp) of the least-squares line log y = log coef + exp log x."""
    exp, log_coef = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(log_coef)), float(exp)


def fit_isoflop(budget, m, d, loss) -> IsoFlopFit:
    """Fit a parabola in ln M to the loss of each budget's runs, take its vertex as M_opt(C), then
    fit M_opt = k C^a and D_opt = C / M_opt = k' C^b by least squares in log-log space.

    ``d`` is only used to check the rows (C ~ M*D within 10%); D_opt follows from C and M_opt.
    """
    budget, m, d, loss = (np.asarray(x, dtype=np.float64) for x in (budget, m, d, loss))
    if not (len(budget) == len(m) == len(d) == len(loss)):
        raise ValueError("budget, M, D and loss columns differ in length")
    bad = np.abs(m * d / budget - 1) > 0.1
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"row {i}: M*D = {m[i] * d[i]:.3g} is not the budget {budget[i]:.3g} (within 10%)")
    budgets = np.unique(budget)
    if len(budgets) < 2:
        raise ValueError("an IsoFLOP fit needs runs at two or more compute budgets")
    m_opt, loss_opt, parabolas = [], [], []
    for c in budgets:
        sel = budget == c
        if sel.sum() < 3:
            raise ValueError(f"budget {c:.3g}: {sel.sum()} runs; a parabola needs at least 3")
        x = np.log(m[sel])
        a2, a1, a0 = np.polyfit(x, loss[sel], 2)
        if a2 <= 0:
            raise ValueError(f"budget {c:.3g}: the loss has no minimum over M (parabola opens downward); "
                             "add runs on both sides of the optimum")
        x_opt = -a1 / (2 * a2)
        m_opt.append(math.exp(x_opt))
        loss_opt.append(a0 - a1 * a1 / (4 * a2))
        parabolas.append((float(a2), float(a1), float(a0)))
    m_opt_arr = np.array(m_opt)
    d_opt_arr = budgets / m_opt_arr
    mk, ma = _power_law(budgets, m_opt_arr)
    dk, da = _power_law(budgets, d_opt_arr)
    return IsoFlopFit(budgets, m_opt_arr, d_opt_arr, np.array(loss_opt), parabolas, mk, ma, dk, da)


def synthetic_isoflop(model_coef: float = PAPER.model_coef, model_exp: float = PAPER.model_exp,
                      budgets: Sequence[float] = (1e17, 3e17, 1e18, 3e18, 1e19, 3e19, 1e20, 3e20),
                      points: int = 10, curvature: float = 0.05, noise: float = 0.0, seed: int = 0):
    """(budget, M, D, loss) rows whose per-budget optimum follows M_opt = model_coef C^model_exp:
    the paper's 8 budgets x ~10 splits, loss = L(C) + curvature (ln M - ln M_opt)^2 (+ noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        centre = math.log(model_coef * c**model_exp)
        floor = 2.0 * c**-0.05  # any decreasing function of C: only the vertex matters to the fit
        for x in np.linspace(centre - 1.5, centre + 1.5, points):
            mm = math.exp(x)
            loss = floor + curvature * (x - centre) ** 2 + noise * rng.standard_normal()
            rows.append((c, mm, c / mm, loss))
    return [np.array(col) for col in zip(*rows)]


def auto_hparams(model_config, training_config, dp_size: int = 1,
                 coefficients: ScalingCoefficients = PAPER) -> dict:
    """``--auto-hparams``: Eq. 1 for this model and the run's token budget.

    D = train_iters x global_batch_size x seq_length as configured; C = M x D. Returns the fields to
    set: ``lr`` = eta_opt, ``global_batch_size`` = B_opt / seq_length rounded to a multiple of
    micro_batch_size x DP, and ``train_iters`` so that the token budget D stays the same.
    """
    t = training_config
    tokens = t.train_iters * t.global_batch_size * t.seq_length
    c = compute(model_scale_of(model_config, t.seq_length), tokens)
    unit = t.micro_batch_size * dp_size
    gbs = max(unit, round(optimal_batch_tokens(c, coefficients) / t.seq_length / unit) * unit)
    return {"lr": optimal_lr(c, coefficients), "global_batch_size": gbs,
            "train_iters": max(1, round(tokens / (gbs * t.seq_length)))}
