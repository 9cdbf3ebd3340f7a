"""The paper's scaling-law numbers (DeepSeek LLM, section 3), reproduced from megatron_ds/scaling.py.

The paper prints its numbers to 3-4 significant figures; rel=1e-3 (or 1% for Table 3, as the issue
asks) is the rounding of the printed value, not slack in the formulas.
"""

import pytest

from megatron_ds import scaling
from megatron_ds.config import model_preset

# Table 3 of the paper: (n_layer, d_model, M as printed). l_seq = 4096 for all rows.
TABLE3 = [
    (8, 512, 352e6),
    (12, 768, 963e6),
    (24, 1024, 3.02e9),
    (24, 2048, 9.66e9),
    (32, 4096, 45.1e9),
    (40, 5120, 85.6e9),
    (80, 8192, 419e9),
]


@pytest.mark.parametrize("n_layer,d_model,m_printed", TABLE3)
def test_table3_model_scale_within_one_percent(n_layer, d_model, m_printed):
    assert scaling.model_scale(n_layer, d_model, 4096) == pytest.approx(m_printed, rel=0.01)


def test_six_n1_and_n2_against_m_for_the_smallest_shape():
    # 6N1/M = 0.43 and 6N2/M = 1.32 for 8 x 512: the 50% misestimate the paper warns about.
    m = scaling.model_scale(8, 512, 4096)
    assert scaling.six_n1(8, 512) / m == pytest.approx(0.43, abs=0.005)
    assert scaling.six_n2(8, 512, 102400) / m == pytest.approx(1.32, abs=0.005)


@pytest.mark.parametrize("preset,m_paper", [("deepseek-7b", 4.247e10), ("deepseek-67b", 4.327e11)])
def test_model_scale_of_the_real_shapes(preset, m_paper):
    assert scaling.model_scale_of(model_preset(preset), 4096) == pytest.approx(m_paper, rel=1e-3)


@pytest.mark.parametrize("preset,batch_m,lr", [("deepseek-7b", 9.24, 4.24e-4), ("deepseek-67b", 19.74, 3.17e-4)])
def test_eq1_optimal_batch_and_lr_at_2t_tokens(preset, batch_m, lr):
    c = scaling.compute(scaling.model_scale_of(model_preset(preset), 4096), 2e12)
    assert scaling.optimal_batch_tokens(c) / 1e6 == pytest.approx(batch_m, rel=1e-3)
    assert scaling.optimal_lr(c) == pytest.approx(lr, rel=2e-3)


def test_eq4_optimal_allocation_at_4_5e23():
    assert scaling.optimal_model_scale(4.5e23) == pytest.approx(4.32e11, rel=2e-3)
    assert scaling.optimal_tokens(4.5e23) == pytest.approx(1.04e12, rel=2e-3)
    # The two laws split the budget: M_opt * D_opt = C (coefficients multiply to 1.0001).
    assert scaling.optimal_model_scale(4.5e23) * scaling.optimal_tokens(4.5e23) == pytest.approx(4.5e23, rel=1e-3)


def test_coefficients_are_settable():
    k = scaling.ScalingCoefficients(model_coef=1.0, model_exp=0.5)
    assert scaling.optimal_model_scale(1e20, k) == pytest.approx(1e10)


@pytest.mark.parametrize("exp", [0.45, 0.5243, 0.578])
def test_isoflop_fit_recovers_known_exponent(exp):
    # The paper's grid (8 budgets x 10 splits) with noise of 0.1% of the loss on each run.
    budget, m, d, loss = scaling.synthetic_isoflop(model_coef=0.2, model_exp=exp, noise=1e-3, seed=1)
    fit = scaling.fit_isoflop(budget, m, d, loss)
    assert fit.model_exp == pytest.approx(exp, abs=0.01)
    assert fit.data_exp == pytest.approx(1 - exp, abs=0.01)


def test_propose_for_a_budget_lands_on_eq4_and_eq1():
    p = scaling.propose(4.5e23)
    assert p.model_scale == pytest.approx(scaling.optimal_model_scale(4.5e23), rel=0.03)  # shapes are discrete
    assert p.hidden_size % p.num_attention_heads == 0 and p.num_attention_heads % 8 == 0
    assert p.lr == pytest.approx(scaling.optimal_lr(4.5e23))
    assert p.milestones == (round(0.8 * p.train_iters), round(0.9 * p.train_iters))


def test_propose_for_7b_at_2t_tokens():
    p = scaling.propose(model_config=model_preset("deepseek-7b"), tokens=2e12)
    assert p.global_batch_size == round(9.236e6 / 4096)
    assert p.lr == pytest.approx(4.24e-4, rel=2e-3)
    assert p.lr_warmup_iters == 2000


def test_cli_propose_and_fit(tmp_path, capsys):
    from tools import scaling_laws

    assert scaling_laws.main(["propose", "--model", "deepseek-67b", "--tokens", "2e12"]) == 0
    assert "peak LR (Eq. 1)    0.0003175" in capsys.readouterr().out
    csv = tmp_path / "runs.csv"
    assert scaling_laws.main(["synth", "--csv", str(csv), "--model-exp-true", "0.55"]) == 0
    capsys.readouterr()
    assert scaling_laws.main(["fit", "--csv", str(csv)]) == 0
    assert "C^0.5500" in capsys.readouterr().out
    assert scaling_laws.main(["fit", "--csv", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.csv" in err


def test_auto_hparams_for_7b_keeps_the_token_budget():
    from megatron_ds.config import TrainingConfig

    t = TrainingConfig(micro_batch_size=1, global_batch_size=2304, seq_length=4096, train_iters=211_935)  # ~2T tokens
    hp = scaling.auto_hparams(model_preset("deepseek-7b"), t, dp_size=8)
    assert hp["lr"] == pytest.approx(4.24e-4, rel=2e-3)
    assert hp["global_batch_size"] % 8 == 0 and hp["global_batch_size"] * 4096 == pytest.approx(9.24e6, rel=0.01)
    assert hp["train_iters"] * hp["global_batch_size"] == pytest.approx(211_935 * 2304, rel=1e-3)


@pytest.mark.parametrize("case", ["budget", "7b", "67b", "7b-seq-8192", "custom"])
def test_printed_flags_build_exactly_the_proposed_model(case, capsys):
    """Pasted into pretrain (whose --model defaults to tiny), the flags tools/scaling_laws.py prints give the
    proposed architecture field for field (KV heads, positions, vocabulary included) and pass validate."""
    import dataclasses

    from megatron_ds.config import ModelConfig, config_from_args, validate
    from tools import scaling_laws

    if case == "custom":  # a model that is no preset: every field a preset sets, and any non-default one
        model = dataclasses.replace(model_preset("deepseek-7b"), num_query_groups=8, norm_epsilon=1e-5, vocab_size=32000)
        p = scaling.propose(model_config=model, tokens=1e11)
    else:
        argv = {"budget": ["--compute", "4.5e23"], "7b": ["--model", "deepseek-7b", "--tokens", "2e12"],
                "67b": ["--model", "deepseek-67b", "--tokens", "2e12", "--milestones", "0.7,0.85,0.95",
                        "--factors", "0.5,0.2,0.05"],
                "7b-seq-8192": ["--model", "deepseek-7b", "--tokens", "2e12", "--seq-length", "8192"]}[case]
        assert scaling_laws.main(["propose", *argv]) == 0
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("flags")][0]
        p = scaling_laws.scaling.propose(**_propose_kwargs(argv))
        assert line.split()[1:] == p.flags()
    cfg = config_from_args(p.flags())
    validate(cfg, world_size=1)
    expected = p.model_config()
    for f in dataclasses.fields(ModelConfig):
        got, want = getattr(cfg.model, f.name), getattr(expected, f.name)
        if f.name == "num_query_groups":
            got, want = cfg.model.num_kv_heads, expected.num_kv_heads
        assert got == want, (f.name, got, want)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_attention_heads) == (
        p.num_layers, p.hidden_size, p.ffn_hidden_size, p.num_attention_heads)
    assert scaling.model_scale_of(cfg.model, p.seq_length) == pytest.approx(p.model_scale)
    t = cfg.training
    assert (t.seq_length, t.global_batch_size, t.train_iters, t.lr_warmup_iters) == (
        p.seq_length, p.global_batch_size, p.train_iters, p.lr_warmup_iters)
    assert t.lr_decay_style == "multistep" and t.lr == pytest.approx(p.lr, rel=1e-2)
    assert [float(x) for x in t.lr_decay_factors.split(",")] == list(p.factors)
    if case == "7b":
        assert p.flags()[:2] == ["--model", "deepseek-7b"] and "--num-layers" not in p.flags()


def _propose_kwargs(argv):
    """The tool's propose arguments, as scaling.propose keywords."""
    kw = dict(zip(argv[::2], argv[1::2]))
    out = {"seq_length": int(kw.get("--seq-length", 4096))}
    if "--model" in kw:
        out.update(model_config=model_preset(kw["--model"]), preset=kw["--model"], tokens=float(kw["--tokens"]))
    else:
        out["compute_budget"] = float(kw["--compute"])
    if "--milestones" in kw:
        out.update(milestones=tuple(map(float, kw["--milestones"].split(","))),
                   factors=tuple(map(float, kw["--factors"].split(","))))
    return out
