"""Benchmarks through lm-evaluation-harness (utils/eval_harness.py, utils/lm_eval_tasks/): the task YAMLs against
lm-eval's installed ones, every cell read as text, bad rows stopped with file:line before a model loads, the same
per-question predictions as lm-eval's own command line, and the checkpoints side by side in the reports."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from conftest import REPO, SHARED, TINY_CONFIG, needs_shared
from utils.errors import ConfigError, MissingInputError
from utils.eval_harness import BENCHMARKS, TEMPLATES, upstream_tasks, write_tasks
from utils.files import DataError
from utils.lm_eval_tasks.local_data import load

EVAL_DATA = SHARED / "data" / "llamafactory_eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
UPSTREAM_TEMPLATES = {"ceval": "ceval/_default_ceval_yaml", "cmmlu": "cmmlu/_default_template_yaml",
                      "mmlu": "mmlu/default/_default_template_yaml", "gsm8k": "gsm8k/gsm8k.yaml"}
# CMMLU-shaped files of our own (the CMMLU set is not in ../shared): two subjects of lm-eval's cmmlu, options that
# pandas would turn into NaN or numbers, a question over two lines.
CMMLU = {"agronomy": ',Question,A,B,C,D,Answer\n0,哪一种作物是豆科植物？,小麦,大豆,玉米,水稻,B\n'
                     '1,"施肥过多会怎样？\n（两行题干）",None,NA,烧苗,1.50,C\n2,土壤酸碱度用什么表示？,pH,007,温度,湿度,A\n',
         "anatomy": ",Question,A,B,C,D,Answer\n0,人体最大的器官是？,心脏,肝脏,皮肤,肺,C\n1,成年人有多少块骨头？,106,206,306,406,B\n"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """results/pt and results/sft: tiny models with random weights drawn wide (initializer_range 0.5), so that their
    answers differ from question to question. The trained fixtures (pt_checkpoint, sft_checkpoint) answered " A" to
    every C-Eval question tried, by lm-eval's protocol: matching predictions would prove little."""
    from transformers import GenerationConfig

    from utils.modeling import GENERATION_DEFAULTS, generation_token_ids

    root = tmp_path_factory.mktemp("results")
    for seed, stage in enumerate(("pt", "sft")):
        set_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CONFIG, initializer_range=0.5))
        # what the stages save with a checkpoint (max_new_tokens 512 among it)
        model.generation_config = GenerationConfig(**GENERATION_DEFAULTS, **generation_token_ids(tokenizer))
        model.save_pretrained(root / stage)
        tokenizer.save_pretrained(root / stage)
    return root


def write_cmmlu(folder):
    for split in ("test", "dev"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for subject, text in CMMLU.items():
            (folder / split / f"{subject}.csv").write_text(text, encoding="utf-8")
    return folder / "test"


def predictions(samples_dir) -> dict:
    """{(doc_id, task): predicted option} from lm-eval's per-sample logs: the option of highest log-likelihood."""
    predicted = {}
    for path in samples_dir.glob("**/samples_*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            scores = [float(response[0]) for response in sample["filtered_resps"]]
            predicted[sample["doc_id"], path.name.split("_20")[0]] = scores.index(max(scores))
    return predicted


# ----------------------------------------------------------------------------------------------------- task files


def test_task_files_are_lm_evals_own_but_for_the_data(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    upstream = upstream_tasks()
    for name, bench in BENCHMARKS.items():
        ours = load_yaml(TEMPLATES / bench.template, resolve_func=False)
        theirs = load_yaml(upstream / UPSTREAM_TEMPLATES[name], resolve_func=False)
        assert ours.pop("custom_dataset").endswith("local_data.load")
        assert ours == {key: value for key, value in theirs.items()
                        if key not in ("dataset_path", "dataset_name", "task", "tag")}, name
    # A generated subject YAML, as lm-eval resolves it, is lm-eval's subject task but for its name, data and split
    # (and, without a dev folder, no few-shot split).
    for split in ("val", "dev"):
        (tmp_path / "ceval" / split).mkdir(parents=True)
        (tmp_path / "ceval" / split / f"computer_network_{split}.csv").write_text(
            "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n")
    (tmp_path / "mmlu" / "val").mkdir(parents=True)
    (tmp_path / "mmlu" / "val" / "abstract_algebra_val.csv").write_text("q,1,2,3,4,B\n")
    chosen = {"ceval": tmp_path / "ceval" / "val", "mmlu": tmp_path / "mmlu" / "val",
              "cmmlu": write_cmmlu(tmp_path / "cmmlu")}
    assert write_tasks(chosen, tmp_path / "tasks", None, None, None) == {
        "local-ceval-valid_computer_network": 1, "local-ceval-valid": 1, "local-mmlu_abstract_algebra": 1,
        "local-mmlu": 1, "local-cmmlu_agronomy": 3, "local-cmmlu_anatomy": 2, "local-cmmlu": 5}
    for ours, theirs in (("local-ceval-valid_computer_network", "ceval/ceval-valid_computer_network.yaml"),
                         ("local-mmlu_abstract_algebra", "mmlu/default/mmlu_abstract_algebra.yaml"),
                         ("local-cmmlu_agronomy", "cmmlu/cmmlu_agronomy.yaml")):
        mine = load_yaml(tmp_path / "tasks" / f"{ours}.yaml", resolve_func=False)
        upstream_config = load_yaml(upstream / theirs, resolve_func=False)
        data_keys = ("custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "task", "tag", "task_alias",
                     "test_split", "validation_split")
        if ours.startswith("local-mmlu"):
            assert mine.pop("fewshot_split") is None and upstream_config.pop("fewshot_split") == "dev"
        assert {k: v for k, v in mine.items() if k not in data_keys} == \
               {k: v for k, v in upstream_config.items() if k not in data_keys}, ours
    group = load_yaml(tmp_path / "tasks" / "local-cmmlu.yaml")
    assert group["task"] == ["local-cmmlu_agronomy", "local-cmmlu_anatomy"]
    assert all(entry["weight_by_size"] for entry in group["aggregate_metric_list"])  # micro average, as lm-eval's


def test_every_cell_is_read_as_text_in_the_hub_datasets_columns(tmp_path):
    write_cmmlu(tmp_path)
    (tmp_path / "m_test.csv").write_text('"Is 1,000 > 999?",True,False,NaN,null,A\n', encoding="utf-8")
    cmmlu = load({"test": [str(tmp_path / "test" / "agronomy.csv")]})["test"]
    assert cmmlu[1] == {"Question": "施肥过多会怎样？\n（两行题干）", "A": "None", "B": "NA", "C": "烧苗", "D": "1.50",
                        "Answer": "C"}
    assert cmmlu[2]["B"] == "007"
    assert load({"test": [str(tmp_path / "m_test.csv")]})["test"][0] == {
        "question": "Is 1,000 > 999?", "subject": "m", "choices": ["True", "False", "NaN", "null"], "answer": 0}


@pytest.mark.parametrize("file_name, text, where, reason", [
    ("a_val.csv", "id,question,A,B,C,D,answer\n0,q,1,2,3,4,B\n1,q,1,2,3,4,E\n", 3,
     "answer 'E' is not one of A, B, C, D"),
    ("a_val.csv", "id,question,A,B,C,D,answer\n0,q,1,2,,4,B\n", 2, "option C is empty"),
    # the quoted cell spans lines 2-3, so the short row is on line 4
    ("a_val.csv", 'id,question,A,B,C,D,answer\n0,"two\nlines",1,2,3,4,A\n1,q,1,2,3\n', 4,
     "5 columns, expected 7 (id, question, A-D, answer)"),
    ("a_val.csv", "input,A,B,C,D,target,extra\n", 1, "unrecognised header"),
    ("a_val.csv", "q,1,2,3,4,A\n", 1, "a mmlu file in a ceval folder"),
    ("math_test.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n\n{"question": "2+2?", "answer": "4"}\n', 3,
     "the answer has no `#### <number>` line"),
    ("math_test.jsonl", '{"question": "1+1?"\n', 1, "not JSON"),
    ("a_val.csv", "id,question,A,B,C,D,answer\n0,中国的首都？,北京,上海,广州,深圳,A\n".encode("gbk"), None,
     "not UTF-8 text"),
])
def test_bad_rows_stop_with_file_and_line_before_a_model_loads(tmp_path, file_name, text, where, reason):
    import mini_qwen_eval

    path = tmp_path / "val" / file_name
    path.parent.mkdir()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    name = "gsm8k" if file_name.endswith(".jsonl") else "ceval"
    # No checkpoint there: a model load would fail with a different error.
    with pytest.raises(DataError) as error:
        mini_qwen_eval.main(["--model_path", str(tmp_path / "no_checkpoint"), "--benchmarks", f"{name}={path.parent}",
                             "--shots", "0"])
    assert str(error.value).startswith(f"{path}:{where}: {reason}" if where else f"{path}: {reason}")


def test_requests_that_cannot_work_are_refused_before_a_model_loads(tmp_path):
    from mini_qwen_eval import main

    folder = write_cmmlu(tmp_path / "cmmlu")
    (tmp_path / "cmmlu" / "dev" / "anatomy.csv").unlink()
    argv = ["--model_path", str(tmp_path / "no_checkpoint"), "--benchmarks", f"cmmlu={folder}"]
    with pytest.raises(ConfigError, match="unknown subjects: nope"):
        main(argv + ["--subjects", "agronomy,nope"])
    with pytest.raises(MissingInputError, match=r"cmmlu: 3-shot needs .*/dev/anatomy\*\.csv"):
        main(argv + ["--shots", "3"])
    with pytest.raises(DataError, match=r"agronomy\.csv: fewer questions than 5 shots"):
        main(argv + ["--shots", "5", "--subjects", "agronomy"])
    (folder / "karaoke.csv").write_text(CMMLU["anatomy"], encoding="utf-8")
    with pytest.raises(DataError, match="karaoke is not a cmmlu subject of lm-eval"):
        main(argv)
    with pytest.raises(MissingInputError, match="gsm8k 5-shot takes its shots from a \\*train\\* file"):
        main(["--model_path", str(tmp_path), "--benchmarks", f"gsm8k={REPO / 'mini_data/grpo/math_en.jsonl'}"])
    with pytest.raises(ConfigError, match="unknown benchmark 'arc'"):
        main(argv[:2] + ["--benchmarks", "arc"])


# ------------------------------------------------------------------------------------------ against lm-eval's CLI


@needs_shared
@pytest.mark.parametrize("shots, limit", [(0, 10), (5, 5)])  # 5-shot prompts are long: fewer questions, as fast
def test_same_predictions_as_lm_evals_command_line(checkpoints, tmp_path, shots, limit):
    from mini_qwen_eval import main

    checkpoint = checkpoints / "pt"
    main(["--model_path", str(checkpoint), "--benchmarks",
          f"ceval={EVAL_DATA / 'ceval' / 'val'},mmlu={EVAL_DATA / 'mmlu' / 'val'}",
          "--subjects", "art_studies,basic_medicine,ideological_and_moral_cultivation,world_religions",
          "--limit", str(limit), "--shots", str(shots), "--dtype", "float32", "--device", "cpu", "--batch_size", "4",
          "--output_dir", str(tmp_path / "ours")])
    ours = tmp_path / "ours" / "benchmarks"
    # lm-eval's CLI (batch size 1, ours 4: padding must not change a prediction), from another directory
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32",
         "--device", "cpu", "--include_path", str(ours / "tasks"), "--tasks", "local-ceval-valid,local-mmlu",
         "--num_fewshot", str(shots), "--limit", str(limit), "--log_samples", "--output_path", str(tmp_path / "cli")],
        cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    mine, theirs = predictions(ours / "pt"), predictions(tmp_path / "cli")
    assert len(mine) == 4 * limit and mine == theirs
    assert len(Counter(mine.values())) >= 3  # the answers vary: matching them means something
    results = json.loads(next((ours / "pt").glob("results_*.json")).read_text())
    cli_results = json.loads(next((tmp_path / "cli").glob("**/results_*.json")).read_text())
    for task in ("local-ceval-valid", "local-mmlu", "local-ceval-valid_art_studies"):
        assert results["results"][task]["acc,none"] == cli_results["results"][task]["acc,none"]
    assert results["n-shot"]["local-ceval-valid_art_studies"] == shots
    # lm-eval's protocol: " A" after "答案：", and shots answered "答案： C"
    sample = json.loads(next((ours / "pt").glob("samples_local-ceval-valid_art_studies_*.jsonl"))
                        .read_text(encoding="utf-8").splitlines()[0])
    assert sample["arguments"]["gen_args_0"]["arg_1"] == " A"
    prompt = sample["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("以下是中国关于艺术学的单项选择题，请选出其中的正确答案。\n\n") and prompt.endswith("\n答案：")
    assert prompt.count("答案： ") == shots


def test_checkpoints_side_by_side_with_cmmlu_and_gsm8k(checkpoints, tmp_path, tokenizer):
    from mini_qwen_eval import main

    cmmlu = write_cmmlu(tmp_path / "cmmlu")
    main(["--model_path", str(checkpoints / "pt"), str(checkpoints / "sft"), "--benchmarks",
          f"cmmlu={cmmlu},gsm8k={REPO / 'mini_data' / 'grpo' / 'math_en.jsonl'}", "--shots", "0", "--limit", "2",
          "--max_new_tokens", "8", "--chat_template", "--device", "cpu", "--output_dir", str(checkpoints / "eval"),
          "--pipeline_report", str(checkpoints)])
    out = checkpoints / "eval" / "benchmarks"
    report = json.loads((out / "report.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["pt", "sft"]
    for run in report["runs"]:
        results = json.loads(Path(run["results_file"]).read_text())["results"]  # lm-eval's own results file
        assert 0 <= results["local-cmmlu"]["acc,none"] <= 1
        assert set(results["local-gsm8k"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
        assert run["questions"] == 4 + 2 and run["questions_per_second"] > 0
    samples = [json.loads(line) for line in
               next((out / "pt").glob("samples_local-cmmlu_agronomy_*.jsonl")).read_text().splitlines()]
    prompt = samples[1]["arguments"]["gen_args_0"]["arg_0"]
    # the description as a system turn, the question as the user's: lm-eval's --apply_chat_template
    assert prompt.startswith("<|im_start|>system\n以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n<|im_end|>\n"
                             "<|im_start|>user\n施肥过多会怎样？\n（两行题干）\nA. None\nB. NA\nC. 烧苗\nD. 1.50\n答案：<|im_end|>")
    gsm8k = json.loads(next((out / "pt").glob("samples_local-gsm8k_*.jsonl")).read_text().splitlines()[0])
    assert gsm8k["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 8
    # and 8 it is, though the checkpoint's generation_config says max_new_tokens 512 (lm-eval issue #2070)
    assert len(tokenizer(gsm8k["resps"][0][0], add_special_tokens=False).input_ids) <= 8
    markdown = (out / "report.md").read_text()
    assert "| benchmark | metric | questions | pt | sft |" in markdown
    assert "--include_path" in markdown and "--apply_chat_template" in markdown
    pipeline = (checkpoints / "report.md").read_text()
    assert "| local-cmmlu | acc,none | 4 |" in pipeline and "| local-gsm8k | exact_match,strict-match | 2 |" in pipeline
