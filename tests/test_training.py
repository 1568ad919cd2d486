"""The DP step is what the accountant assumes: clipped per-example gradients, summed, one step per batch.

The reference is a hand-written loop: one forward/backward per example, its gradient norm, the
clipping factor min(1, C / (norm + 1e-6)), the sum. Opacus's result, read where the optimizer
hands the noised gradient to the inner optimizer (noise off), must equal it for every supported
task x method x grad_sample_mode, in one physical batch and in pieces.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from dpops.assess import evaluation
from dpops.config.schema import DEFAULT_GRAD_SAMPLE_MODE, JobConfig, LoraSettings
from dpops.errors import ConfigError
from dpops.models import hf as modeling
from dpops.privacy.plan import Plan
from dpops.train import private_step
from dpops.train import schedule as schedules
from dpops.train import trainer as training
from tests.helpers import public_dataset
from tests.tiny_models import tiny_bert, tiny_llama

LORA = {"classification": LoraSettings(target_modules=["query", "value"]), "causal_lm": LoraSettings(target_modules=["q_proj", "v_proj"])}
METHODS = {"classification": ["lora", "full", "head", "bitfit"], "causal_lm": ["lora", "full", "bitfit"]}
CASES = [(task, method, mode) for task, methods in METHODS.items() for method in methods for mode in ("hooks", "ghost", "bk")]
TEXTS = ["a fine film", "dull , slow and far too long for what it says", "yes", "the cast is superb and the script sharp",
         "no", "an odd little thing"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"classification": tiny_bert(root / "bert"), "causal_lm": tiny_llama(root / "llama")}


def _batch(base):
    ids, mask = modeling.encode(modeling.load_tokenizer(base), TEXTS, 24)
    return ids, mask, torch.tensor([1, 0, 1, 1, 0, 0])


def _net(task, method, base):
    torch.manual_seed(0)
    net = modeling.build(task, method, base, n_labels=2, lora=LORA[task])
    with torch.no_grad():  # move every trainable weight off its initialisation (LoRA's B starts at zero)
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net


def _hand_clipped_sum(net, task, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients one example at a time; returns (their norms, flat per-example grads)."""
    ids, mask, y = batch
    inputs = modeling.model_inputs(ids, mask)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = []
    for i in range(len(y)):
        net.zero_grad()
        one = [t[i : i + 1] for t in inputs]
        modeling.per_example_loss(task, net(*one), y[i : i + 1], one[0], one[1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    g = torch.stack(grads)
    return g.norm(dim=1), g


@pytest.mark.parametrize("max_physical", [None, 4])
@pytest.mark.parametrize("task,method,mode", CASES)
def test_clipped_summed_gradient_equals_per_example_loop(bases, task, method, mode, max_physical):
    """In float64: float32 rounding alone reached a relative error of 1.07e-5 on the tiny Llama's full
    fine-tuning (ghost, bk), where float64 leaves 4e-8 and 2e-7 (the losses are cast to float32)."""
    base = bases[task]
    batch = _batch(base)
    net = _net(task, method, base).double()
    norms, per_example = _hand_clipped_sum(copy.deepcopy(net), task, batch)
    clip = float(norms.median())  # half the examples are clipped, half are not
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    expected = (per_example * (clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)).sum(dim=0)

    n = len(batch[2])
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(
        net, torch.optim.SGD(params, lr=0.0), task=task, mode=mode, noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=n,
    )
    seen = []  # the optimizer's gradient just before the inner step: (clipped sum + noise) / expected batch size
    private.optimizer.attach_step_hook(lambda opt: seen.append(torch.cat([p.grad.flatten() * n for p in opt.params])))
    private_step.noisy_step(private, batch, device=torch.device("cpu"), max_physical=max_physical)

    assert len(seen) == 1, "one noisy step per logical batch, however many pieces"
    rel = float((seen[0] - expected).norm() / expected.norm())
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_pieces_cover_the_batch_within_the_bound_shortest_first():
    lengths = torch.tensor([5, 1, 8, 3, 8, 2, 7, 1, 4, 6])
    mask = (torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.arange(10).unsqueeze(1) * mask  # row i holds the value i on its real tokens
    batch = (ids, mask, torch.arange(10))
    pieces = private_step.pieces(batch, 3)
    assert [len(p[0]) for p in pieces] == [3, 3, 3, 1]
    # every record once, each with its own ids, mask and label
    records = sorted((int(y), p[0][i].tolist(), p[1][i].tolist()) for p in pieces for i, y in enumerate(p[2]))
    assert records == [(i, ids[i].tolist(), mask[i].tolist()) for i in range(10)]
    piece_lengths = [p[1].sum(dim=1).tolist() for p in pieces]
    assert [x for piece in piece_lengths for x in piece] == sorted(lengths.tolist())
    # padded to each piece's longest: 3*2 + 3*5 + 3*8 + 8 = 53 token slots, not 10 * 8
    assert sum(len(p[0]) * max(length) for p, length in zip(pieces, piece_lengths, strict=True)) == 53
    assert private_step.pieces(batch, 10) == [batch]  # a batch within the bound is left as it is
    empty = (ids[:0], mask[:0], torch.arange(0))
    assert [len(p[0]) for p in private_step.pieces(empty, 3)] == [0]


def test_empty_poisson_batch_still_adds_noise(bases):
    """An empty batch is a step of the mechanism: noise is added to a zero sum and the weights move."""
    net = _net("classification", "lora", bases["classification"])
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(
        net, torch.optim.SGD(params, lr=1.0), task="classification", mode="hooks", noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4,
    )
    before = [p.detach().clone() for p in params]
    ids, mask, y = _batch(bases["classification"])
    private_step.noisy_step(private, (ids[:0], mask[:0], y[:0]), device=torch.device("cpu"), max_physical=None)
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_per_layer_clipping_refuses_tied_weights(tmp_path, mode):
    base = tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    net = modeling.build("causal_lm", "full", base, n_labels=2, lora=LORA["causal_lm"])
    params = [p for p in net.parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match="training.grad_sample_mode.*tied weights"):
        private_step.make_private(net, torch.optim.SGD(params, lr=0.1), task="causal_lm", mode=mode, noise_multiplier=1.0,
                              max_grad_norm=1.0, expected_batch_size=4)


def test_bookkeeping_backward_computes_no_unclipped_weight_gradient(bases):
    """Book-keeping's one backward pass computes only what flows between layers: autograd never
    accumulates a weight gradient (the clipped sum is written once, by book-keeping itself)."""
    net = _net("classification", "full", bases["classification"])
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(net, torch.optim.SGD(params, lr=0.0), task="classification", mode="bk",
                                    noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=6)
    accumulated = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    private.backward(*_batch(bases["classification"]))
    assert accumulated == []
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert all(p.requires_grad for p in params), "the weights are trainable again after the pass"


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(self.layer(x))


def test_bookkeeping_refuses_layers_it_cannot_clip():
    from dpops.train import bookkeeping

    with pytest.raises(ConfigError, match=r"training.grad_sample_mode.*'conv' \(Conv1d\)"):
        bookkeeping.BookKeeping(_Conv(), max_grad_norm=1.0)
    frozen = _Conv()
    frozen.conv.requires_grad_(False)  # a frozen layer of any kind is fine: only trainable weights are clipped
    bookkeeping.BookKeeping(frozen, max_grad_norm=1.0)(torch.randn(3, 4, 5))
    inner = _Twice()
    twice = bookkeeping.BookKeeping(inner, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="'layer', which runs more than once"):
        twice(torch.randn(3, 4))
    inner(torch.randn(3, 4)).sum().backward()  # outside the wrapper the model is untouched by its hooks
    assert inner.layer.weight.grad is not None


def test_lora_target_modules_that_do_not_exist_name_the_field(bases):
    with pytest.raises(ConfigError, match="lora.target_modules"):
        modeling.build("classification", "lora", bases["classification"], n_labels=2, lora=LoraSettings(target_modules=["q_proj"]))


def test_head_only_is_refused_for_a_language_model():
    with pytest.raises(ValueError, match="field 'method'"):
        JobConfig(name="j", dataset="d", registered_model="m", task="causal_lm", method="head", dp={"target_epsilon": 1})


def _job(base, **fields) -> JobConfig:
    return JobConfig(name="j", dataset="d", registered_model="m", model={"path": str(base)}, dp={"target_epsilon": 8}, **fields)


def _plan(n: int, *, q: float = 0.25, steps: int = 3) -> Plan:
    return Plan(dataset="d", n_records=n, sample_rate=q, expected_batch_size=q * n, steps=steps, noise_multiplier=1.0,
                max_grad_norm=1.0, delta=1e-3, target_epsilon=8.0, epsilon=8.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_train_runs_the_planned_steps_in_pieces_and_records_the_mode(bases, tmp_path, method):
    df = pd.DataFrame({"text": TEXTS * 4, "label": [1, 0, 1, 1, 0, 0] * 4})
    job = _job(bases["classification"], method=method, training={"max_physical_batch_size": 2})
    done = []
    result = training.train(job, _plan(len(df), steps=4), df, dataset=public_dataset(), labels=["0", "1"], output_dir=tmp_path / "m", on_step=done.append)
    assert result.steps_run == 4 and done == [1, 2, 3, 4]
    assert result.grad_sample_mode == DEFAULT_GRAD_SAMPLE_MODE[method]
    assert (result.device, result.precision) == ("cpu", "fp32")
    net, _, meta = modeling.load(tmp_path / "m")
    assert (meta["method"], meta["task"]) == (method, "classification")
    metrics = evaluation.evaluate(tmp_path / "m", df, batch_size=5)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["majority_baseline"] == 0.5


@pytest.mark.slow
def test_causal_lm_trains_and_reloads(bases, tmp_path):
    df = pd.DataFrame({"text": TEXTS * 4, "label": [0] * 24})
    job = _job(bases["causal_lm"], task="causal_lm", lora=LORA["causal_lm"].model_dump())
    result = training.train(job, _plan(len(df), steps=2), df, dataset=public_dataset(), labels=["0", "1"], output_dir=tmp_path / "lm")
    assert result.steps_run == 2 and result.grad_sample_mode == "hooks"
    net, tokenizer, meta = modeling.load(tmp_path / "lm")
    assert meta["task"] == "causal_lm"
    ids, mask = modeling.encode(tokenizer, ["a fine film"], 8)
    assert net(*modeling.model_inputs(ids, mask)).shape[-1] == tokenizer.vocab_size
    metrics = evaluation.evaluate(tmp_path / "lm", df.head(6), batch_size=4)
    assert "accuracy" not in metrics and metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    losses, predictions = evaluation.per_example_loss(tmp_path / "lm", df.head(6), batch_size=4)
    assert losses.shape == (6,) and predictions is None


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1, 1, 1, 1, 1, 1]),
    ("constant", 2, [1 / 2, 1, 1, 1, 1, 1]),
    ("linear", 0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ("linear", 2, [1 / 2, 1, 1, 2 / 3, 1 / 3]),
    ("cosine", 1, [1, 1, (1 + math.cos(math.pi / 4)) / 2, 1 / 2, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_learning_rate_schedule_warms_up_decays_and_never_stops_a_charged_step(schedule, warmup, expected):
    from dpops.config.schema import OptimSettings

    optim = OptimSettings(schedule=schedule, warmup_steps=warmup)
    factors = [schedules.learning_rate_factor(optim, done, len(expected)) for done in range(len(expected))]
    assert factors == pytest.approx(expected)
    assert min(factors) > 0  # every step is charged for, so every step moves the weights


def test_weight_average_is_the_ramped_exponential_average_of_the_iterates():
    p = nn.Parameter(torch.zeros(3))
    average = schedules.WeightAverage([p], decay=0.5)
    expected = torch.zeros(3)
    for t, value in enumerate([4.0, 2.0, 8.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        average.update([p])
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    assert torch.equal(p, torch.full((3,), 8.0))  # updating leaves the weights alone
    average.copy_to([p])
    assert torch.allclose(p, expected)


@pytest.mark.slow
def test_train_follows_the_schedule_and_saves_the_average(bases, tmp_path, monkeypatch):
    df = pd.DataFrame({"text": TEXTS * 4, "label": [1, 0, 1, 1, 0, 0] * 4})
    job = _job(bases["classification"], optim={"learning_rate": 0.01, "schedule": "linear", "warmup_steps": 1, "ema_decay": 0.9})
    rates, iterates = [], []
    adam_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    update = schedules.WeightAverage.update

    def recording_update(self, params):
        iterates.append([p.detach().clone() for p in params])
        update(self, params)

    monkeypatch.setattr(schedules.WeightAverage, "update", recording_update)
    result = training.train(job, _plan(len(df), steps=4), df, dataset=public_dataset(), labels=["0", "1"], output_dir=tmp_path / "m")
    assert result.steps_run == 4
    assert rates == pytest.approx([0.01 * f for f in (1, 1, 2 / 3, 1 / 3)])
    net, _, _ = modeling.load(tmp_path / "m")
    saved = {n: p for n, p in net.named_parameters()}
    initial = _initial(bases, job)
    trained, average = list(initial), list(initial.values())
    for t, weights in enumerate(iterates, start=1):
        d = min(0.9, (1 + t) / (10 + t))
        average = [d * a + (1 - d) * w for a, w in zip(average, weights, strict=True)]
    assert len(trained) == len(average)
    for name, expected in zip(trained, average, strict=True):
        assert torch.allclose(saved[name], expected, atol=1e-6), name
    assert not all(torch.allclose(saved[n], w) for n, w in zip(trained, iterates[-1], strict=True))  # not the last iterate


def _initial(bases, job) -> dict[str, torch.Tensor]:
    """The trainable weights by name, as ``train`` initialises them (its seeded model build)."""
    torch.manual_seed(job.seed)
    net = modeling.build("classification", "lora", bases["classification"], n_labels=2, lora=job.lora)
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task,method,mode", [("classification", "lora", "hooks"), ("classification", "full", "ghost"),
                                              ("classification", "full", "bk")])
def test_bf16_autocast_step_stays_close_to_the_fp32_reference(bases, task, method, mode):
    """bf16 autocast runs the forward pass in bfloat16; weights, clipping and noise stay fp32."""
    base = bases[task]
    batch = _batch(base)
    net = _net(task, method, base)
    norms, per_example = _hand_clipped_sum(copy.deepcopy(net), task, batch)
    clip = float(norms.median())
    expected = (per_example * (clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)).sum(dim=0)
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(net, torch.optim.SGD(params, lr=0.0), task=task, mode=mode, noise_multiplier=0.0,
                                    max_grad_norm=clip, expected_batch_size=6, autocast_dtype=torch.bfloat16)
    seen = []
    private.optimizer.attach_step_hook(lambda opt: seen.append(torch.cat([p.grad.flatten() * 6 for p in opt.params])))
    private_step.noisy_step(private, batch, device=torch.device("cpu"), max_physical=None)
    assert all(p.dtype == torch.float32 for p in params)
    assert float((seen[0] - expected).norm() / expected.norm()) < 0.05


def test_device_resolution_on_this_machine():
    from dpops.config.schema import TrainingSettings

    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    assert training.resolve_device(TrainingSettings()) == (torch.device("cpu"), None)
    assert training.resolve_device(TrainingSettings(precision="bf16")) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="training.device"):
        training.resolve_device(TrainingSettings(device="cuda"))


@pytest.mark.parametrize("change,field", [
    ({"training": {"grad_sample_mode": "ew"}}, "training.grad_sample_mode"),
    ({"method": "prefix"}, "method"),
    ({"training": {"max_physical_batch_size": 0}}, "training.max_physical_batch_size"),
    ({"task": "causal_lm", "method": "head"}, "method"),
    ({"optim": {"warmup_steps": 10**6}}, "optim.warmup_steps"),
    ({"optim": {"schedule": "step"}}, "optim.schedule"),
    ({"optim": {"ema_decay": 1.0}}, "optim.ema_decay"),
])
def test_job_file_refuses_unsupported_training_settings(tmp_path, project_root, change, field):
    from dpops.config.loading import load_job_config

    data = {**yaml.safe_load((project_root / "configs/jobs/sst2_smoke.yaml").read_text()), **change}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"{path}.*field '{field}"):
        load_job_config(path)
