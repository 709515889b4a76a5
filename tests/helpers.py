"""Small builders shared by the Trainer-level tests."""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainingArguments

from kto_plugin import KTOConfig, KTOPlugin


def args(tmp_path, **overrides: Any) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        train_sampling_strategy="sequential",
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def kto_trainer(model, tokenizer, rows, tmp_path, kto_kwargs=None, trainer_cls=Trainer, plugin_kwargs=None,
                eval_rows=None, **arg_overrides):
    kto = KTOPlugin(KTOConfig(**{"max_length": 96, **(kto_kwargs or {})}), tokenizer=tokenizer, **(plugin_kwargs or {}))
    trainer = trainer_cls(
        model=model,
        args=args(tmp_path, **arg_overrides),
        train_dataset=kto.prepare_dataset(rows),
        eval_dataset=kto.prepare_dataset(eval_rows, name="eval") if eval_rows is not None else None,
        data_collator=kto.collator,
    )
    return kto, trainer


def cache_hub_dataset(cache_dir, repo_id, rows, tmp_path):
    """Leave in `cache_dir` what `datasets.load_dataset(repo_id)` leaves after an online load of a Hub repository
    holding `rows` as JSON lines: the JSON builder's Arrow files under ``<namespace>___<name>/default/0.0.0/<commit>``.
    Built by datasets' own JSON builder (no network); `repo_id` is set after construction because the builder
    refuses local data files for a repository it would otherwise read from the Hub."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    source = tmp_path / "hub_source.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(source))
    builder = Json(cache_dir=str(cache_dir), dataset_name=repo_id.split("/")[1], config_name="default",
                   config_id="default", data_files={"train": str(source)}, hash="0" * 40)
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()


def offline_datasets_cache(tmp_path, monkeypatch):
    """An empty datasets cache in `tmp_path`, and datasets in offline mode (nothing may reach the network)."""
    import datasets

    cache = tmp_path / "datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache
