"""Credentials are masked by exact field names and inside URIs; nothing else is hidden."""

from __future__ import annotations

from components.config import PipelineConfig
from components.redact import mask_secrets, redact_uri


def test_fields_named_like_tokens_are_not_secrets():
    dump = PipelineConfig().model_dump(mode="json")
    masked = mask_secrets(dump)
    assert masked["tokenize"] == dump["tokenize"]  # cutoff_len, cpt_block_size, ... stay visible
    assert masked["evaluate"]["max_new_tokens"] == dump["evaluate"]["max_new_tokens"]


def test_credential_fields_and_uri_secrets_are_masked():
    data = {"hf_token": "hf_abc", "db_password": "pw", "api_key": None, "nested": [{"client_secret": "x"}],
            "tracking_uri": "https://alice:s3cret@mlflow.example.org/",
            "url": "https://host/f.jsonl?sig=abc&X-Amz-Signature=def&X-Amz-Credential=ghi&split=train"}
    out = mask_secrets(data)
    assert out["hf_token"] == "***" and out["db_password"] == "***" and out["nested"][0]["client_secret"] == "***"
    assert out["api_key"] is None  # nothing to hide
    assert out["tracking_uri"] == "https://alice:***@mlflow.example.org/"
    assert "abc" not in out["url"] and "def" not in out["url"] and "ghi" not in out["url"]
    assert "split=train" in out["url"]


def test_plain_strings_and_clean_uris_are_unchanged():
    for value in ("sqlite:////tmp/mlflow.db", "data/icd10/dataset_info.json", "https://host/a.jsonl?split=train",
                  "You are a helpful assistant."):
        assert redact_uri(value) == value


def test_saved_run_config_masks_a_tracking_uri_password(tmp_path):
    from components.config import load_config, save_config

    cfg = load_config(None, ["tracking.tracking_uri=https://bob:hunter2@mlflow.internal/"])
    save_config(cfg, tmp_path / "config.yaml", masked=True)
    text = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in text and "bob:***@mlflow.internal" in text
