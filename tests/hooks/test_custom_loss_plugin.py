"""examples/custom_loss_plugin: the installable `kto-logsigmoid` package, by entry point and by object."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import kto_trainer
from kto_plugin import KTOConfig, KTOPlugin
from kto_plugin.cli import main
from reference_impl import naive_kto_logsigmoid_losses, naive_weighted_mean

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loss_plugin"
METRIC = "kto_logsigmoid/grad_weight"


@pytest.fixture
def plugin_module(monkeypatch):
    """The example's module imported from its source folder, without installing the package."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("kto_logsigmoid", None)
    yield importlib.import_module("kto_logsigmoid")
    sys.modules.pop("kto_logsigmoid", None)


LABELS = {
    "mixed": [True, False, False, True, True],
    "all_desirable": [True] * 5,
    "all_undesirable": [False] * 5,
}


@pytest.mark.parametrize("labels", list(LABELS), ids=list(LABELS))
@pytest.mark.parametrize("kl,beta", [(0.0, 0.1), (0.7, 0.1), (2.5, 0.5)])
def test_loss_and_gradients_match_the_slow_reference(plugin_module, labels, kl, beta):
    torch.manual_seed(3)
    policy = (torch.randn(5) * 20 - 60).requires_grad_()
    reference = torch.randn(5) * 20 - 60
    label = torch.tensor(LABELS[labels])
    config = KTOConfig(loss_type="kto_logsigmoid", beta=beta)
    ours = plugin_module.kto_loss(
        loss_type="kto_logsigmoid",
        policy_logps=policy,
        reference_logps=reference,
        kl=torch.tensor(kl),
        labels=label,
        config=config,
    )
    policy_ref = policy.detach().clone().requires_grad_()
    slow = naive_kto_logsigmoid_losses(policy_ref, reference, label, torch.tensor(kl), beta)
    torch.testing.assert_close(ours, slow, rtol=1e-6, atol=1e-7)
    per_example_grad = torch.autograd.grad(slow.sum(), policy_ref, retain_graph=True)[0]
    naive_weighted_mean(ours, label, 1.3, 0.8).backward()
    naive_weighted_mean(slow, label, 1.3, 0.8).backward()
    torch.testing.assert_close(policy.grad, policy_ref.grad, rtol=1e-6, atol=1e-9)
    # the metric is |d loss_i / d margin_i| = |d loss_i / d policy_logps_i| / beta, averaged
    metric = plugin_module.kto_metrics(
        policy_logps=policy.detach(),
        reference_logps=reference,
        kl=torch.tensor(kl),
        labels=label,
        config=config,
    )
    assert metric[METRIC].item() == pytest.approx((per_example_grad.abs() / beta).mean().item(), rel=1e-5)


def test_other_loss_types_are_left_alone(plugin_module):
    x = torch.zeros(2)
    args = dict(policy_logps=x, reference_logps=x, kl=x[0], labels=torch.tensor([True, False]))
    assert plugin_module.kto_loss(loss_type="kto", config=KTOConfig(), **args) is None
    assert plugin_module.kto_metrics(config=KTOConfig(), **args) is None
    assert plugin_module.kto_loss_types() == {"kto_logsigmoid": True}


def _one_sgd_step(model, tokenizer, rows, tmp_path, loss_type, plugins):
    kto, trainer = kto_trainer(
        model,
        tokenizer,
        rows,
        tmp_path,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        kto_kwargs={"loss_type": loss_type},
        plugin_kwargs={"plugins": plugins},
    )
    kto.attach(trainer)
    start = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    trainer.train()
    delta = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - start
    return delta, trainer.state.log_history[0]


def test_registered_by_object_it_trains_and_its_first_step_is_twice_kto(
    plugin_module, base_model, tokenizer, rows, tmp_path
):
    # At step 1 r = 0 and z0 = 0: each example's d loss / d r is beta * sigmoid(0) = beta/2 for log-sigmoid
    # and beta * sigmoid(0)^2 = beta/4 for KTO, so one SGD step moves every weight exactly twice as far.
    delta_logsig, log = _one_sgd_step(
        copy.deepcopy(base_model), tokenizer, rows, tmp_path, "kto_logsigmoid", [plugin_module]
    )
    delta_kto, log_kto = _one_sgd_step(
        copy.deepcopy(base_model), tokenizer, rows, tmp_path, "kto", [plugin_module]
    )
    assert delta_kto.abs().max() > 1e-3
    assert log["grad_norm"] == pytest.approx(2 * log_kto["grad_norm"], rel=1e-6)
    torch.testing.assert_close(delta_logsig, 2 * delta_kto, rtol=1e-4, atol=1e-6)  # w - lr*g rounds to 1e-7
    assert log["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert log[METRIC] == pytest.approx(0.5, rel=1e-6)
    assert log_kto["loss"] == pytest.approx(0.5, rel=1e-6) and METRIC not in log_kto


def test_installed_it_is_found_through_its_entry_point(tmp_path, monkeypatch, caplog, capsys, request):
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, src)  # pip builds in the source folder: keep the repository clean
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("kto_logsigmoid", None)
    request.addfinalizer(lambda: sys.modules.pop("kto_logsigmoid", None))
    eps = importlib.metadata.distribution("kto-logsigmoid").entry_points
    assert [(ep.group, ep.name, ep.value) for ep in eps] == [
        ("kto_plugin", "kto_logsigmoid", "kto_logsigmoid")
    ]

    out = tmp_path / "run"
    argv = [
        "train",
        "--loss_type",
        "kto_logsigmoid",
        "--demo_pairs",
        "24",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--max_length",
        "128",
        "--dataloader_drop_last",
        "true",
    ]
    # installed but switched off: the loss type is unknown
    assert main(argv) == 1  # one line on stderr, with the flag's name
    assert "kto-plugin train: error: Unknown --loss_type 'kto_logsigmoid'" in capsys.readouterr().err
    monkeypatch.delenv("KTO_PLUGIN_DISABLE_AUTOLOAD")
    with caplog.at_level(logging.INFO, logger="kto_plugin"):
        assert main(argv) == 0
    assert sys.modules["kto_logsigmoid"].__file__ == str(site / "kto_logsigmoid.py")  # the installed copy
    assert "kto_logsigmoid [entry point 'kto_logsigmoid' of kto-logsigmoid 0.1.0]" in caplog.text
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # r = 0, z0 = 0 at step 1
    assert steps[0][METRIC] == pytest.approx(0.5, rel=1e-6)
    assert 0 < steps[1][METRIC] < 1
    evals = [h for h in history if "eval_loss" in h]
    assert evals and "eval_" + METRIC in evals[-1]


def test_a_plugin_by_object_needs_no_installation(plugin_module, tokenizer, monkeypatch):
    monkeypatch.setenv("KTO_PLUGIN_DISABLE_AUTOLOAD", "1")
    kto = KTOPlugin(KTOConfig(loss_type="kto_logsigmoid"), tokenizer=tokenizer, plugins=[plugin_module])
    assert kto.plugins.describe()[0] == ("kto_logsigmoid", "KTOPlugin(plugins=...)")
    assert kto.needs_kl
