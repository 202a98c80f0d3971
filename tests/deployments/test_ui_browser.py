"""The real UIs in a headless browser, as an operator sees them: the Prefect UI's custom-run page of the
`icd10-manual` deployment (prefect.yaml's demo preset, deployed to a real `prefect server`) shows every
field of the config with the preset's value and never `[object Object]`; the MLflow UI's page of a
registered version shows its lineage tags.

Optional: needs `apt-get install -y chromium` and `pip install playwright` (the Debian browser; pip's
playwright downloads none here). Skipped when either is missing. Screenshots land in each test's tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.deployments.conftest import api_settings, create_process_pool, running_prefect_server
from tests.servers import free_port, running_server

pytestmark = pytest.mark.e2e

DEPLOYMENT = "icd10-manual"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
PAGE_TIMEOUT_MS = 120_000  # the UIs' JavaScript bundles load slowly on 2 busy cores

# Each editable input of the Prefect (v1) form with the labels of the fields it sits in, outermost
# first: ["config", "Supervised fine-tuning", "Learning Rate"]. Checkboxes read as "true"/"false".
FORM_INPUTS_JS = """() => {
  const label = prop => prop.querySelector(':scope > .p-label__header .schema-form-property__label')
    ?.textContent.trim().replace(/ \\(Optional\\)$/, '');
  return Array.from(document.querySelectorAll('.schema-form-property input, .schema-form-property textarea'))
    .map(input => {
      const path = [];
      for (let p = input.closest('.schema-form-property'); p; p = p.parentElement.closest('.schema-form-property')) {
        path.unshift(label(p));
      }
      return [path, input.type === 'checkbox' ? String(input.checked) : input.value];
    });
}"""
ALL_INPUT_VALUES_JS = "() => Array.from(document.querySelectorAll('input, textarea')).map(e => e.value)"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Debian chromium for playwright to drive; skips the module (before any server starts) when it or
    playwright is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: `pip install playwright` (and `apt-get install -y chromium`) "
                    "enables the browser test")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: `apt-get install -y chromium` enables the browser test")
    return path


@pytest.fixture
def browser(chromium):
    """Headless chromium for one test. Per test, because playwright's sync API holds an event loop in this
    thread while it runs, and the servers' fixtures use asyncio.run to set up."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # No background traffic: on a machine without outside network, Chromium's own calls home hang.
        launched = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-quic"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """A `prefect server` with its UI and prefect.yaml's `icd10-manual` deployment registered on it, as
    `lmforge deploy` registers it; yields (UI base URL, deployment id, its parameters)."""
    from deployments.deploy import deploy, planned_deployments

    plan = next(p for p in planned_deployments() if p.name == DEPLOYMENT)
    with running_prefect_server(tmp_path_factory.mktemp("prefect-ui"), ui=True) as (url, _):
        create_process_pool(url, plan.work_pool_name)
        with api_settings(url):
            (deployment_id,) = deploy([plan])
        yield url.removesuffix("/api"), deployment_id, plan.parameters


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """`mlflow server` on a SQLite store holding one registered version made as the register stage makes it
    (lineage tags, alias); yields (UI base URL, model name, version, its tags)."""
    from components import tracking
    from components.pipeline import RunInfo, StageInputs
    from components.registry import lineage_tags, register_model

    root = tmp_path_factory.mktemp("mlflow-ui")
    store = f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", store, "--default-artifact-root", str(root / "artifacts")]
    # The server's background job runner is not needed to show pages; on 2 cores it slows the start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running_server(command, env, f"{url}/health", root / "server.log"):
        # Written to the database directly, as flow runs do while `mlflow ui` reads it; after the server
        # started, so the two do not race in creating its schema.
        client = tracking.client_for(store)
        exp = tracking.experiment_id(client, "lmforge", root / "artifacts")
        run = RunInfo(tracking_uri=store, experiment_id=exp, parent_run_id="", flow_run_id="3f1c2a9e-5d7b-4e11-9a0c-1b2d3e4f5a6b",
                      config_digest="c" * 64, git_commit="0123456789abcdef0123456789abcdef01234567")
        upstream = {
            "prepare": {"cache_key": "k-prepare", "info": {"model_digest": "m" * 64, "revision": None}},
            "align": {"cache_key": "k-align", "digest": "a" * 64},
            "tokenize": {"cache_key": "k-tokenize", "digest": "t" * 64},
            "sft": {"cache_key": "k-sft"},
        }
        tags = lineage_tags(StageInputs(node="register", kind="register", upstream=upstream, run=run),
                            "embedded:smollm2-135m-instruct")
        model_dir = root / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        run_id = tracking.start_run(client, exp, "model")
        version = register_model(client, name="icd10-coder", run_id=run_id, model_dir=model_dir,
                                 files=["config.json"], tags=tags, alias="challenger")
        tracking.end_run(client, run_id)
        yield url, "icd10-coder", version, tags


def _resolve(schema: dict, definitions: dict) -> dict:
    """The schema a value is rendered with: `$ref` followed, `X | None` taken as X."""
    if "$ref" in schema:
        return _resolve(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    return _resolve(options[0], definitions) if len(options) == 1 else schema


def form_fields(schema: dict, definitions: dict, value, path: tuple[str, ...] = ()):
    """(labels, property schema, value) for every field the form renders for `value`, in form order: the
    fields of sections and of each item of a list of objects; none inside a section set to None."""
    schema = _resolve(schema, definitions)
    if isinstance(value, dict) and "properties" in schema:
        for key, prop in schema["properties"].items():
            if key in value:
                # The UI labels a field by its title; a section (a bare $ref) has none and gets its name, title-cased.
                labels = (*path, prop.get("title") or key.replace("_", " ").title())
                yield labels, prop, value[key]
                yield from form_fields(prop, definitions, value[key], labels)
    elif isinstance(value, list):
        for item in value:
            yield from form_fields(schema.get("items", {}), definitions, item, path)


def expected_form_inputs(schema: dict, definitions: dict, value) -> dict[tuple, list]:
    """What the form must show for `value`: (field labels -> values in order) for every editable scalar.
    None (a type switch set to None) and choices (a dropdown, not an input) have no input to read."""
    out: dict[tuple, list] = defaultdict(list)
    for labels, prop, field_value in form_fields(schema, definitions, value):
        resolved = _resolve(prop, definitions)
        values = field_value if isinstance(field_value, list) else [field_value]
        if isinstance(field_value, list):
            resolved = _resolve(resolved.get("items", {}), definitions)
        if isinstance(field_value, dict) and "properties" not in resolved:  # a free-form map: a JSON editor
            out[labels].append(field_value)
            continue
        scalars = [v for v in values if isinstance(v, (str, int, float))]
        if scalars and "enum" not in resolved and "const" not in resolved:
            out[labels] += scalars
    return out


def _numbers_as_floats(value):
    """A JSON value with every number a float: the editor writes 2.0 as 2, as JavaScript does."""
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _comparable(value) -> float | str:
    """A preset value and an input's text made comparable: a number input shows 3e-4 as 0.0003, so numbers
    compare as numbers; a toggle reads "true"/"false"; a map and a JSON editor's text compare as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(_numbers_as_floats(value), sort_keys=True)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            return json.dumps(_numbers_as_floats(json.loads(value)), sort_keys=True)
    try:
        return float(value)
    except ValueError:
        return value


def _differences(expected: dict, shown: dict) -> list[str]:
    exp = {p: [_comparable(v) for v in vs] for p, vs in expected.items()}
    got = {p: [_comparable(v) for v in vs] for p, vs in shown.items()}
    return [f"{' / '.join(p)}: expected {exp.get(p)}, shown {got.get(p)}"
            for p in sorted(set(exp) | set(got)) if exp.get(p) != got.get(p)]


def _open_custom_run(browser, base: str, deployment_id: str, model_base: str, prefix: str = ""):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"{base}{prefix}/deployments/deployment/{deployment_id}/run", wait_until="networkidle")
    # Rendered once the form holds the deployment's values (the model's base is one of them).
    page.wait_for_function("base => Array.from(document.querySelectorAll('textarea')).some(t => t.value === base)",
                           arg=model_base)
    return page


def test_custom_run_form_shows_every_field_of_the_preset(chromium, prefect_ui, browser, tmp_path):
    from prefect.utilities.callables import parameter_schema

    from flows.domain_adaptation import domain_adaptation

    base, deployment_id, parameters = prefect_ui
    page = _open_custom_run(browser, base, deployment_id, parameters["config"]["model"]["base"])
    page.screenshot(path=str(tmp_path / "prefect-custom-run.png"), full_page=True)
    text = page.inner_text("body")
    shown: dict[tuple, list[str]] = defaultdict(list)
    for path, value in page.evaluate(FORM_INPUTS_JS):
        shown[tuple(path)].append(value)
    page.close()

    # The UI's own attributes may hold "[object Object]" (its list widget's `state`); what a person
    # reads and edits, the text and the inputs' values, must not.
    assert "[object Object]" not in text
    assert not [v for values in shown.values() for v in values if "[object" in v]

    # Every editable field of the preset, nested sections and lists of rules included, under its labels.
    schema = parameter_schema(domain_adaptation).model_dump_for_openapi()
    expected = expected_form_inputs(schema, schema["definitions"], parameters)
    sft_lr = shown[("config", "Supervised fine-tuning", "Learning Rate")]
    assert [float(v) for v in sft_lr] == [parameters["config"]["sft"]["learning_rate"]]
    assert ("config", "Promotion", "Rules", "Metric") in expected  # the walk reached a list of objects
    assert not _differences(expected, shown), "\n".join(_differences(expected, shown))

    # Every field's description (the config's docs) under its label, as markdown renders it: code spans
    # lose their backticks, and a bare <placeholder> outside one is taken for an HTML tag and dropped.
    described = {prop["description"] for _, prop, _ in form_fields(schema, schema["definitions"], parameters)
                 if "description" in prop}
    assert len(described) > 50
    flat_text = " ".join(text.split())
    rendered = lambda d: re.sub(r"`([^`]*)`|<[^>]*>", lambda m: m.group(1) or "", d)  # noqa: E731
    undescribed = [d for d in described if " ".join(rendered(d).split()) not in flat_text]
    assert not undescribed, undescribed
    # The stage parameters next to the config.
    for name in ("config", "from_stage", "only", "until", "verify"):
        assert f"{name} (Optional)" in text


def test_v2_custom_run_form_shows_the_preset_values(chromium, prefect_ui, browser, tmp_path):
    # Prefect's newer UI (/v2, one click away in the sidebar) renders the same schema with its own widgets.
    from prefect.utilities.callables import parameter_schema

    from flows.domain_adaptation import domain_adaptation

    base, deployment_id, parameters = prefect_ui
    page = _open_custom_run(browser, base, deployment_id, parameters["config"]["model"]["base"], prefix="/v2")
    page.screenshot(path=str(tmp_path / "prefect-v2-custom-run.png"), full_page=True)
    text = page.inner_text("body")
    values = page.evaluate(ALL_INPUT_VALUES_JS)
    page.close()

    assert "[object Object]" not in text
    assert not [v for v in values if "[object" in v]
    schema = parameter_schema(domain_adaptation).model_dump_for_openapi()
    expected = expected_form_inputs(schema, schema["definitions"], parameters)
    # Every text value of the preset is in some input (v2 labels sections by their class names, so the
    # values are matched without their labels).
    texts = {p: vs for p, vs in expected.items() if isinstance(vs[0], str)}
    assert ("config", "Model", "Base") in texts
    missing = {p: v for p, vs in texts.items() for v in vs if v not in values}
    assert not missing, missing
    assert "Learning Rate (Optional)" in text and "from_stage (Optional)" in text


def test_registered_version_page_shows_the_lineage_tags(chromium, mlflow_ui, browser, tmp_path):
    base, name, version, tags = mlflow_ui
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    # Not "networkidle": MLflow's UI keeps requests going; the test waits for what it reads instead.
    page.goto(f"{base}/#/models/{name}/versions/{version}", wait_until="domcontentloaded")
    page.get_by_text("lmforge.config_digest", exact=True).first.wait_for()
    page.screenshot(path=str(tmp_path / "mlflow-model-version.png"), full_page=True)
    text = page.inner_text("body")
    page.close()

    assert f"Version {version}" in text and "challenger" in text
    assert {"lmforge.config_digest", "lmforge.git_commit", "prefect.flow_run_id", "lmforge.stage_key.sft",
            "lmforge.data_digest.tokenize", "lmforge.base_model"} <= set(tags)
    lines = {line.strip() for line in text.splitlines()}
    missing = {key: value for key, value in tags.items() if key not in lines or (value and value not in lines)}
    assert not missing, f"tags not shown on the version page: {missing}"
