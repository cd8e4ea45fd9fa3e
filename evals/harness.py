"""lm-eval adapter: zero-shot GLUE / SuperGLUE / HellaSwag on a loaded CHTsL model.

Everything task-specific is lm-eval's own: the built-in task YAML (prompt, choices, metrics) is
loaded with `lm_eval.tasks._yaml_loader.load_yaml` and handed to `simple_evaluate` as a dict
config; the model is scored by `HFLM` wrapped around our model instance. The only things we
change in a task config are where its data comes from (`--data-dir`: local jsonl/parquet files
in the hub's schema) and its `tag` (dropped, so local copies never re-register lm-eval's `glue`
tag).

Import this module only after `enable_offline()` when working offline: `datasets` and
`lm_eval` read the offline switches when they are imported.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutput

from chtsl_infer.console import iter_jsonl
from chtsl_infer.errors import ChtslError, first_line
from chtsl_infer.utils import atomic_path

# name -> the built-in YAML defining it, relative to lm_eval/tasks
TASK_YAMLS: dict[str, str] = {
    "cola": "glue/cola/default.yaml",
    "mnli": "glue/mnli/default.yaml",
    "mnli_mismatch": "glue/mnli/mismatch.yaml",
    "mrpc": "glue/mrpc/default.yaml",
    "qnli": "glue/qnli/default.yaml",
    "qqp": "glue/qqp/default.yaml",
    "rte": "glue/rte/default.yaml",
    "sst2": "glue/sst2/default.yaml",
    "wnli": "glue/wnli/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "cb": "super_glue/cb/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "multirc": "super_glue/multirc/default.yaml",
    "sglue_rte": "super_glue/rte/default.yaml",
    "wic": "super_glue/wic/default.yaml",
    "wsc": "super_glue/wsc/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}
# lm-eval's tags, minus what we cannot run (`record`, see UNSUPPORTED)
GROUPS: dict[str, tuple[str, ...]] = {
    "glue": ("cola", "mnli", "mnli_mismatch", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli"),
    "super-glue-lm-eval-v1": ("boolq", "cb", "copa", "multirc", "sglue_rte", "wic", "wsc"),
}
UNSUPPORTED: dict[str, str] = {
    "record": "its lm-eval helpers import transformers.data.metrics, which transformers 5 removed",
}
# hub dataset -> the folder holding its local copy under --data-dir
DATASET_DIRS: dict[str, str] = {"nyu-mll/glue": "glue", "aps/super_glue": "super_glue", "Rowan/hellaswag": "hellaswag"}
DATA_SUFFIXES = (".jsonl", ".parquet")
# the hub columns each task's prompt, choices and target read (local files must carry them)
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence", "label"),
    "mnli": ("premise", "hypothesis", "label"),
    "mnli_mismatch": ("premise", "hypothesis", "label"),
    "mrpc": ("sentence1", "sentence2", "label"),
    "qnli": ("question", "sentence", "label"),
    "qqp": ("question1", "question2", "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "sst2": ("sentence", "label"),
    "wnli": ("sentence1", "sentence2", "label"),
    "boolq": ("passage", "question", "label"),
    "cb": ("premise", "hypothesis", "label"),
    "copa": ("premise", "choice1", "choice2", "question", "label"),
    "multirc": ("paragraph", "question", "answer", "label"),
    "sglue_rte": ("premise", "hypothesis", "label"),
    "wic": ("sentence1", "sentence2", "start1", "end1", "label"),
    "wsc": ("text", "span1_text", "span2_text", "span2_index", "label"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
}
# classes of each task's integer `label` (hellaswag's hub labels are the strings "0".."3")
N_LABELS: dict[str, int] = {"mnli": 3, "mnli_mismatch": 3, "cb": 3, "hellaswag": 4}
INT_COLUMNS = frozenset({"start1", "end1", "span2_index"})
LIST_COLUMNS = frozenset({"endings"})
BOOTSTRAP_ITERS = 1000  # lm-eval's default 100000 takes over an hour for qqp's f1 stderr on 2 CPU cores


def enable_offline() -> None:
    """Switches the Hugging Face hub and `datasets` offline, also when they are already imported.

    The environment variables cover modules imported later; modules already imported read them at
    import time into the module constants patched here (`chtsl` imports transformers, and with it
    huggingface_hub, before any command runs).
    """
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
    if (ds := sys.modules.get("datasets.config")) is not None:
        ds.HF_HUB_OFFLINE = True
        ds.HF_DATASETS_OFFLINE = True


def task_names() -> list[str]:
    """Every name `--tasks` accepts: the tasks, then the groups."""
    return [*TASK_YAMLS, *GROUPS]


def resolve_tasks(spec: str) -> tuple[list[str], list[str]]:
    """(tasks, notes): the comma-separated `spec` with groups expanded, in order, deduplicated.

    Raises ChtslError naming the valid choices for an unknown name.
    """
    tasks: list[str] = []
    notes: list[str] = []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ChtslError(f"no task given; valid: {', '.join(task_names())}")
    for name in names:
        if name in UNSUPPORTED:
            raise ChtslError(f"task {name!r} is not supported: {UNSUPPORTED[name]}")
        if name in GROUPS:
            expanded = GROUPS[name]
            if name == "super-glue-lm-eval-v1":
                notes.append(f"{name}: record skipped ({UNSUPPORTED['record']})")
        elif name in TASK_YAMLS:
            expanded = (name,)
        else:
            raise ChtslError(f"unknown task {name!r}; valid: {', '.join(task_names())}")
        tasks.extend(t for t in expanded if t not in tasks)
    return tasks, notes


def builtin_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of `task` (its `include`s merged, `!function`s resolved), `tag` dropped."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / TASK_YAMLS[task], resolve_func=True)
    if config.get("task") != task:  # guards against a future lm-eval moving its YAML files
        raise ChtslError(f"lm-eval's {TASK_YAMLS[task]} defines {config.get('task')!r}, expected {task!r}")
    config.pop("tag", None)
    return config


def data_file(config: dict[str, Any], data_dir: Path) -> Path:
    """The local evaluation split of a task: DIR/<dataset>/<config>/<split>.jsonl (or .parquet).

    <dataset> is glue, super_glue or hellaswag; <config> the hub config name ("default" when the
    hub dataset has none). Raises ChtslError naming the exact path expected when it is missing.
    """
    folder = DATASET_DIRS[config["dataset_path"]]
    split = config["validation_split"]
    base = data_dir / folder / (config.get("dataset_name") or "default") / split
    for suffix in DATA_SUFFIXES:
        if base.with_suffix(suffix).is_file():
            return base.with_suffix(suffix)
    raise ChtslError(f"task {config['task']!r} needs {base.with_suffix('.jsonl')} (or .parquet) in --data-dir")


def check_data_file(task: str, path: Path) -> int:
    """Rows of a local split, after checking it parses and has `REQUIRED_COLUMNS[task]` (ChtslError
    naming the file, line and missing columns otherwise: lm-eval's own errors name neither)."""
    need = REQUIRED_COLUMNS[task]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
        except (OSError, ValueError) as e:
            raise ChtslError(f"cannot read {path}: {first_line(e)}") from None
        missing = [c for c in need if c not in meta.schema.names]
        if missing:
            raise ChtslError(f"{path} lacks column(s) {', '.join(missing)} (task {task!r} reads {', '.join(need)})")
        return meta.num_rows
    rows = 0
    try:
        for lineno, record in iter_jsonl(path):
            missing = [c for c in need if not isinstance(record, dict) or c not in record]
            if missing:
                raise ChtslError(f"{path}:{lineno} lacks {', '.join(missing)} "
                                f"(task {task!r} reads {', '.join(need)})")
            problem = _row_problem(task, record, need)
            if problem:
                raise ChtslError(f"{path}:{lineno}: {problem} (task {task!r})")
            rows += 1
    except (OSError, UnicodeDecodeError) as e:
        raise ChtslError(f"cannot read {path}: {e}") from None
    if rows == 0:
        raise ChtslError(f"{path} has no examples")
    return rows


def _row_problem(task: str, record: dict[str, Any], need: tuple[str, ...]) -> str | None:
    """Why lm-eval could not score this row (a label outside the task's classes, a null or
    non-text field), or None. lm-eval itself would crash (IndexError) or score it silently."""
    n = N_LABELS.get(task, 2)
    label = record["label"]
    if task == "hellaswag" and isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
        return f"label {record['label']!r} is not one of the task's classes 0..{n - 1}"
    for column in need:
        value = record[column]
        if column == "label":
            continue
        if column in INT_COLUMNS:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif column in LIST_COLUMNS:
            ok = isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value)
            kind = f"a list of {n} strings"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            return f"{column} is {value!r}, not {kind}"
    return None


def task_configs(tasks: Iterable[str], data_dir: Path | None) -> list[dict[str, Any]]:
    """One dict config per task; with `data_dir`, reading its evaluation split from local files."""
    configs = []
    for task in tasks:
        config = builtin_config(task)
        if data_dir is not None:
            path = data_file(config, data_dir)
            check_data_file(task, path)
            split = config["validation_split"]
            config.update(
                dataset_path="parquet" if path.suffix == ".parquet" else "json",
                dataset_name=None,
                dataset_kwargs={"data_files": {split: str(path)}},
                training_split=None,  # no train file locally; zero-shot never reads it
                test_split=None,
            )
        configs.append(config)
    return configs


class RuntimeModule(torch.nn.Module):
    """A `chtsl_infer.runtime.backends.Runtime` as a causal LM module, which is all HFLM (loglikelihood
    requests) and `chtsl_infer.model.loss.perplexity` need: `forward(input_ids (b, seq))` returns an output whose
    `.logits` are (b, seq, vocab); `.config` and `.device` as a transformers model. Other inputs
    (an attention mask) are ignored: batches are right-padded, so a causal model's logits at the
    real tokens do not depend on the padding."""

    def __init__(self, runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.config = runtime.config

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def forward(self, input_ids: torch.Tensor, **_: Any) -> CausalLMOutput:
        return CausalLMOutput(logits=self.runtime.logits(input_ids).to(input_ids.device))

    def tie_weights(self) -> None:  # HFLM calls it on any module; the runtime's weights are already tied
        pass


def progress_lm(model, tokenizer, batch_size: int, max_length: int, progress=None):  # -> HFLM
    """`HFLM` around our model instance, reporting loglikelihood requests to a Rich `progress`.

    The requests are scored in chunks so the bar moves. A request's log-probability depends only on
    its own tokens (right-padded causal batches), so chunking changes nothing beyond float rounding
    of differently shaped batches.
    """
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        chunk = max(64, 8 * batch_size)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            task = progress.add_task("lm-eval loglikelihood requests", total=len(requests)) if progress else None
            out: list[tuple[float, bool]] = []
            for start in range(0, len(requests), self.chunk):
                chunk = requests[start : start + self.chunk]
                out.extend(super().loglikelihood(chunk, disable_tqdm=True))
                if progress is not None:
                    progress.advance(task, len(chunk))
            return out

    return ProgressHFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length
    )


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    log_samples: bool = False,
    progress=None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` results of `model` (moved/cast by the caller) on `tasks`, zero-shot."""
    from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
    from jinja2.exceptions import UndefinedError
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ChtslError("the checkpoint's tokenizer needs bos and eos tokens for lm-eval")
    configs = task_configs(tasks, data_dir)
    lm = progress_lm(model, tokenizer, batch_size, model.config.max_position_embeddings, progress)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=configs,
            num_fewshot=0,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=log_samples,
            task_manager=TaskManager(include_defaults=False),
        )
    except (ConnectionError, DatasetNotFoundError) as e:  # the hub, without --data-dir
        hint = "" if data_dir is not None else "; pass --data-dir DIR to read local copies"
        raise ChtslError(f"cannot load the task data: {first_line(e)}{hint}") from None
    except (DatasetGenerationError, UndefinedError) as e:  # a malformed or mis-schemed data file
        raise ChtslError(f"cannot use the task data: {first_line(e.__cause__ or e)}") from None
    if results is None:  # only on non-zero ranks of a distributed run
        raise ChtslError("lm-eval returned no results")
    return results


@dataclass(frozen=True)
class MetricRow:
    """One reported number: `value` ± `stderr` (None when lm-eval gives none) over `n` examples."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


def metric_rows(results: dict[str, Any]) -> list[MetricRow]:
    """The metrics of `simple_evaluate` results, in task order (lm-eval keys are `metric,filter`)."""
    rows = []
    for task, metrics in results["results"].items():
        n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            rows.append(MetricRow(task, metric, float(value), stderr, n))
    return rows


def results_table(rows: list[MetricRow], title: str):  # -> rich.table.Table
    """Rich table: task, metric, value ± stderr, n."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "metric", "value", "± stderr", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in rows:
        stderr = "—" if r.stderr is None else f"{r.stderr:.4f}"
        table.add_row(r.task, r.metric, f"{r.value:.4f}", stderr, str(r.n))
    return table


def _jsonable(data: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(data, default=handle_non_serializable))


def samples_path(output: Path) -> Path:
    """Where `--log-samples` records go: beside `output`, `<stem>.samples.jsonl`."""
    return output.with_name(f"{output.stem}.samples.jsonl")


def write_results(results: dict[str, Any], output: str | Path, log_samples: bool, force: bool = False) -> list[Path]:
    """Writes lm-eval's results JSON to `output` ("-": stdout) and, with `log_samples`, the
    per-sample records beside it (`samples_path`: one JSON object per line, with a `task` field).

    All or nothing: every file is written to a temporary name first, then renamed into place.
    Returns the paths written.
    """
    from chtsl_infer.console import check_output_file, write_json

    summary = _jsonable({k: v for k, v in results.items() if k != "samples"})
    if str(output) == "-":
        write_json(summary, "-")
        return []
    files = {Path(output): json.dumps(summary, indent=2) + "\n"}
    if log_samples:
        samples = results.get("samples") or {}
        records = ({"task": task, **r} for task, rs in samples.items() for r in rs)
        files[samples_path(Path(output))] = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
    for path in files:
        check_output_file(path, force, "--json")
    try:
        with ExitStack() as stack:  # every file is renamed into place only once all are written
            for path, text in files.items():
                stack.enter_context(atomic_path(path)).write_text(text)
    except OSError as e:
        raise ChtslError(f"cannot write {e.filename or output}: {e.strerror or e}") from None
    return list(files)


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silences lm-eval's per-request warnings, its per-document tqdm bar and `datasets`' bars while
    lm-eval runs (our Rich bar replaces them), and sends its bare `print`s (bootstrapping notes) to
    stderr so stdout holds only results; restores everything afterwards. The bootstrap-stderr bar
    of mcc/f1 stays: lm-eval imports tqdm inside that function."""
    import logging
    import sys

    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    saved_level, saved_tqdm = logger.level, lm_eval.api.task.tqdm
    bars_were_enabled = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    datasets.disable_progress_bars()
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(saved_level)
        lm_eval.api.task.tqdm = saved_tqdm
        if bars_were_enabled:
            datasets.enable_progress_bars()
