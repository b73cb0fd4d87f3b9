"""Evaluation: prompt sets, sampling (deterministic, resumable, multi-turn), the rules judge,
win-rate statistics, the judge CLI, and the default job's judged win rates after training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from eval.judge import comparisons, judge_all, judge_files
from eval.judges import Comparison, Judgement, RulesJudge, demo_answer_correct
from eval.prompts import EvalPrompt, load_prompts, prompts_of
from eval.sampling import GenerationSettings, hf_generator, read_samples, sample
from eval.stats import describe, summarize, wilson_interval
from preference_datasets import DataError, LabelledResponse, PreferencePair, make_demo_pairs
from tests.conftest import ROOT, TINY_OVERRIDES

# ----------------------------------------------------------------------------- the rules judge

RIGHT_AND_WRONG = [
    ("Name the capital city of Bolivia.", "Sucre is the capital; La Paz is the seat of government.", "It is La Paz, not Sucre."),
    ("Name the capital city of the United States.", "Washington, D.C. is the capital.", "The capital is New York."),
    ("Name the capital city of India.", "New Delhi. Not Washington D.C.", "The capital city of India is Washington D.C. It is New Delhi."),
    ("Compute the sum of 361 and 220.", "The sum is 581.", "361 + 220 = 582"),
    ("Compute the sum of 361 and 220.", "581", "I think it is 580 or so."),
    ("What do you get when you multiply 19 and 12?", "19 x 12 = 228, since 19 x 10 = 190.", "It is 240."),
    ("Is 16.36 or 16.8 the greater number?", "16.8 is larger than 16.36.", "16.36 is greater than 16.8."),
    ("Is 16.36 or 16.8 the greater number?", "Of the two, the greater number is 16.8.", "The bigger one is 16.36: more digits."),
    ("Which is larger, 9.11 or 9.9?", "Comparing them. Of 9.11 and 9.9, 9.9 is larger.", "9.11 is larger."),
]


@pytest.mark.parametrize(("question", "right", "wrong"), RIGHT_AND_WRONG)
def test_rules_judge_on_hand_written_answers(question, right, wrong):
    assert demo_answer_correct(question, right)
    assert not demo_answer_correct(question, wrong)
    judge = RulesJudge()
    prompt = [{"role": "user", "content": question}]
    assert judge.judge(Comparison("1", prompt, right, wrong)).verdict == "A"
    assert judge.judge(Comparison("1", prompt, wrong, right)).verdict == "B"
    assert judge.judge(Comparison("1", prompt, wrong, wrong)).verdict == "tie"
    assert judge.judge(Comparison("1", prompt, right, right)).verdict == "tie"
    assert not demo_answer_correct(question, "I do not know.")


def test_rules_judge_knows_every_demo_answer_and_no_other_question():
    for held_out in (False, True):
        for pair in make_demo_pairs(128, seed=3, held_out=held_out):
            question = pair.prompt[0]["content"]
            assert demo_answer_correct(question, pair.chosen) and not demo_answer_correct(question, pair.rejected), question
    with pytest.raises(ValueError, match="not a demo question"):
        demo_answer_correct("Write a poem about the sea.", "The sea.")


# ----------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_published_values():
    # the 95 % Wilson score intervals of 0/10, 5/10 and 81/263 as tabulated (Newcombe 1998; Wilson 1927)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_summary_counts_errors_apart_and_reports_both_win_rates():
    summary = summarize(["A"] * 6 + ["B"] * 2 + ["tie"] + ["none"] + ["error"] * 3)
    assert (summary["comparisons"], summary["wins"], summary["losses"], summary["ties"], summary["no_verdict"], summary["errors"]) == (
        13, 6, 2, 1, 1, 3)
    assert summary["win_rate"]["rate"] == pytest.approx(6 / 10)  # the paper's: wins over everything judged
    assert summary["decided_win_rate"]["rate"] == pytest.approx(6 / 8)
    assert summary["win_rate_ties_half"]["rate"] == pytest.approx(7 / 10)
    assert summary["lose_rate"]["rate"] == pytest.approx(2 / 10) and summary["tie_rate"]["rate"] == pytest.approx(2 / 10)
    assert summary["win_rate"]["ci95"] == pytest.approx(list(wilson_interval(6, 10)))
    assert "6 wins, 1 ties, 2 losses, 1 without a verdict, 3 errors (not counted)" in describe(summary)


# ----------------------------------------------------------------------------- prompt sets


def test_prompt_sets_from_local_files(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Task {i}", "output": "x", "dataset": "koala"}) + "\n" for i in range(3)))
    prompts = load_prompts("alpaca_eval", path=str(alpaca))
    assert [p.id for p in prompts] == ["alpaca_eval-000", "alpaca_eval-001", "alpaca_eval-002"]
    assert prompts[2].messages == [{"role": "user", "content": "Task 2"}] and prompts[2].extra["dataset"] == "koala"
    bench = tmp_path / "mt.jsonl"
    bench.write_text(json.dumps({"question_id": 81, "category": "math", "turns": ["Q1", "Q2"], "reference": ["R1", "R2"]}) + "\n")
    (question,) = load_prompts("mt_bench", path=str(bench))
    assert (question.id, question.follow_ups, question.references, question.turns) == ("81", ("Q2",), ("R1", "R2"), 2)
    bench.write_text(json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    with pytest.raises(DataError, match=r"mt.jsonl, line 1: 'turns' must be a list"):
        load_prompts("mt_bench", path=str(bench))
    with pytest.raises(DataError, match="prompts=heldout: give the training run"):
        load_prompts("heldout")
    with pytest.raises(DataError, match="mt_bench_prompts/raw/question.jsonl cannot be loaded from the hub .*give prompts_path"):
        load_prompts("mt_bench")  # the tests run offline
    with pytest.raises(DataError, match="prompts=vicuna_bench: no copy on the hub; give prompts_path"):
        load_prompts("vicuna_bench")


def test_heldout_prompts_once_each_with_their_chosen_answer():
    prompt = [{"role": "user", "content": "Q"}]
    examples = [PreferencePair(prompt, "good", "bad", "hh"), PreferencePair(prompt, "good 2", "bad 2", "hh"),
                LabelledResponse([{"role": "user", "content": "R"}], "meh", False, "kto")]
    prompts = prompts_of(examples)
    assert [(p.id, p.chosen) for p in prompts] == [("hh-00000", "good"), ("kto-00001", None)]


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def tiny_generator(shared_cache):
    """The random `tiny` model with weights large enough that greedy answers depend on the prompt."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["model=tiny", f"cache_dir={shared_cache}", "+model.random_init.initializer_range=0.5"])
    tokenizer = train.load_tokenizer(cfg)
    return hf_generator(train.load_policy(cfg, tokenizer), tokenizer)


def bench_prompts(count: int) -> list[EvalPrompt]:
    return [EvalPrompt(str(i), [{"role": "user", "content": f"Question number {i} about {'cats' if i % 2 else 'rain'}?"}],
                       follow_ups=("And why?",) if i % 3 == 0 else ()) for i in range(count)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_is_deterministic_and_a_rerun_resumes_where_it_stopped(tmp_path, tiny_generator, temperature):
    prompts, settings = bench_prompts(7), GenerationSettings(temperature=temperature, max_new_tokens=6, batch_size=3)
    calls = []

    def counting(conversations, settings):
        calls.append(len(conversations))
        return tiny_generator(conversations, settings)

    whole = sample(prompts, counting, settings, tmp_path / "whole", {"checkpoint": "tiny"})
    rows = read_samples(whole)
    assert list(rows) == [p.id for p in prompts] and len({row["response"] for row in rows.values()}) > 3  # answers differ by prompt
    again = sample(prompts, tiny_generator, settings, tmp_path / "again", {"checkpoint": "tiny"})
    assert again.read_text() == whole.read_text()
    # a run stopped after its first batch, in the middle of writing the second's first line
    lines = whole.read_text().splitlines(keepends=True)
    stopped = tmp_path / "stopped" / "samples.jsonl"
    stopped.parent.mkdir()
    stopped.write_text("".join(lines[:3]) + lines[3][:20])
    calls.clear()
    sample(prompts, counting, settings, stopped.parent, {"checkpoint": "tiny"})
    assert stopped.read_text() == whole.read_text()
    assert calls == [3, 1, 1, 1]  # batches 2 and 3 only (two turns for prompt 3 and 6), batch 1 skipped
    with pytest.raises(Exception, match="holds samples of another setting .*generation"):
        sample(prompts, tiny_generator, GenerationSettings(temperature=0.5), stopped.parent, {"checkpoint": "tiny"})


def test_a_second_turn_is_asked_after_the_models_own_first_answer(tmp_path):
    seen = []

    def echo(conversations, settings):
        seen.extend(conversations)
        return [f"answer to {conversation[-1]['content']}" for conversation in conversations]

    prompt = EvalPrompt("81", [{"role": "user", "content": "Q1"}], follow_ups=("Q2",), references=("R1", "R2"))
    rows = read_samples(sample([prompt], echo, GenerationSettings(), tmp_path, {"checkpoint": "x"}))
    first_turn = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "answer to Q1"}]
    assert seen[1] == [*first_turn, {"role": "user", "content": "Q2"}]
    assert rows["81"]["responses"] == ["answer to Q1", "answer to Q2"] and rows["81"]["references"] == ["R1", "R2"]


def test_left_padding_gives_each_prompt_the_answer_it_gets_alone(tiny_generator):
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "A much longer question that needs many more tokens?")]
    settings = GenerationSettings(max_new_tokens=5)
    together = tiny_generator(prompts, settings)
    assert together == [tiny_generator([prompt], settings)[0] for prompt in prompts]


# ----------------------------------------------------------------------------- judging files


def write_samples(path: Path, answers: dict[str, str], chosen: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": key, "prompt": [{"role": "user", "content": QUESTIONS[key]}], "response": answer,
             **({"chosen": chosen[key]} if chosen else {})} for key, answer in answers.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


QUESTIONS = {"1": "Compute the sum of 2 and 3.", "2": "What is 4 times 5?", "3": "Which is larger, 9.11 or 9.9?"}
CHOSEN = {"1": "2 plus 3 equals 5.", "2": "4 times 5 equals 20.", "3": "9.9 is larger than 9.11."}


def test_judge_two_files_and_against_chosen(tmp_path):
    aligned = write_samples(tmp_path / "aligned" / "samples.jsonl", {"1": "5", "2": "It is 21.", "3": "9.9 is larger."}, CHOSEN)
    sft = write_samples(tmp_path / "sft" / "samples.jsonl", {"1": "6", "2": "20", "3": "9.11 is larger."})
    summary = judge_files(aligned, sft, RulesJudge(), tmp_path / "vs_sft")
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 0, 1)
    summary = judge_files(aligned, "chosen", RulesJudge(), tmp_path / "vs_chosen")
    assert (summary["wins"], summary["ties"], summary["losses"]) == (0, 2, 1)
    judged = [json.loads(line) for line in (tmp_path / "vs_chosen" / "judgements.jsonl").read_text().splitlines()]
    assert [row["verdict"] for row in judged] == ["tie", "B", "tie"] and judged[1]["detail"] == "A wrong, B correct"
    partial = write_samples(tmp_path / "partial" / "samples.jsonl", {"1": "5"})
    with pytest.raises(DataError, match="no response to prompt 2"):
        comparisons(aligned, partial)
    with pytest.raises(DataError, match="has no chosen response"):
        comparisons(sft, "chosen")


def test_a_rerun_asks_again_only_what_ended_in_an_error(tmp_path):
    class Flaky:
        name = "flaky"

        def __init__(self, failing):
            self.failing, self.asked = failing, []

        def judge(self, pair):
            self.asked.append(pair.id)
            if pair.id in self.failing:
                raise ValueError("judge unreachable")
            return Judgement("A", "ok")

    pairs = [Comparison(str(i), [], "a", "b") for i in range(4)]
    first = judge_all(pairs, Flaky({"1", "3"}), tmp_path / "judgements.jsonl")
    assert [row["verdict"] for row in first] == ["A", "error", "A", "error"] and first[1]["detail"] == "judge unreachable"
    assert summarize(row["verdict"] for row in first)["errors"] == 2
    second = Flaky(set())
    rows = judge_all(pairs, second, tmp_path / "judgements.jsonl")
    assert second.asked == ["1", "3"] and [row["verdict"] for row in rows] == ["A"] * 4
    assert len((tmp_path / "judgements.jsonl").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------- the command lines


def cli(module: str, *arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_training_ends_with_judged_win_rates_and_the_clis_sample_and_judge_its_checkpoint(tmp_path, shared_cache):
    """The default job's evaluation on `tiny` (its answers are all wrong, so every comparison with
    the chosen answers is a loss), then `eval.sample` on the run and `eval.judge` on the result."""
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("eval.")] + [f"runs_root={tmp_path / 'runs'}", f"cache_dir={shared_cache}"]
    trained = subprocess.run([sys.executable, "train.py", *overrides, "datasets.demo.test_size=12", "eval.generation.max_new_tokens=4"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = [path.parent for path in (tmp_path / "runs").glob("*/*/summary.json")]
    judged = json.loads((run_dir / "summary.json").read_text())["judged"]
    assert set(judged) == {"align vs sft", "align vs chosen", "sft vs chosen"}
    assert judged["align vs chosen"]["comparisons"] == 12 and judged["align vs chosen"]["losses"] == 12
    assert "align vs chosen (rules judge, 12 held-out prompts): win rate 0.0 % [0.0, " in trained.stdout
    assert len(read_samples(run_dir / "samples" / "sft_heldout" / "samples.jsonl")) == 12

    sampled = cli("eval.sample", f"checkpoint={run_dir}", "generation.max_new_tokens=4", "generation.batch_size=16", "max_prompts=5",
                  f"output_dir={tmp_path / 'cli'}", f"cache_dir={shared_cache}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert f"Samples: {tmp_path / 'cli' / 'samples.jsonl'}" in sampled.stdout
    rows = read_samples(tmp_path / "cli" / "samples.jsonl")
    after_training = read_samples(run_dir / "samples" / "align_heldout" / "samples.jsonl")
    assert [row["response"] for row in rows.values()] == [row["response"] for row in list(after_training.values())[:5]]
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["checkpoint"] == str(run_dir / "align" / "final")
    judged = cli("eval.judge", f"responses={tmp_path / 'cli' / 'samples.jsonl'}", "baseline=chosen", cwd=tmp_path)
    assert judged.returncode == 0, judged.stderr[-3000:]
    assert "(0 wins, 0 ties, 5 losses" in judged.stdout
    result = json.loads((tmp_path / "cli" / "judged_rules_vs_chosen" / "result.json").read_text())
    assert result["losses"] == 5 and result["win_rate"]["ci95"] == pytest.approx(list(wilson_interval(0, 5)))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cli", "runs"]  # no Hydra folders or logs left behind

    samples = tmp_path / "cli" / "samples.jsonl"
    refused = cli("eval.judge", f"responses={samples}", f"baseline={tmp_path / 'missing.jsonl'}", cwd=tmp_path)
    assert refused.returncode == 2 and "missing.jsonl" in refused.stderr and "Traceback" not in refused.stderr


def test_sample_cli_refuses_bad_settings_in_one_line_each(tmp_path):
    result = cli("eval.sample", "model=tiny", "prompts=nope", "generation.temperature=-1", "generation.batch_size=0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = result.stderr.strip().splitlines()
    assert errors == [
        "error: prompts='nope': choose one of heldout, alpaca_eval, mt_bench, vicuna_bench",
        "error: generation.temperature=-1: out of range, give a number in [0, inf]",
        "error: generation.batch_size=0: give a whole number of at least 1",
    ]


def test_the_rules_judge_after_training_is_refused_on_data_it_cannot_judge(make_cfg):
    from checks import check_config
    from utils import ConfigError

    with pytest.raises(ConfigError, match=r"eval.after_training='rules': the rules judge checks the demo data's answers only"):
        check_config(make_cfg("datasets=[hh]", "eval.after_training=rules"))
    assert check_config(make_cfg("datasets=[hh]")) is not None  # auto: no judge for hh yet, nothing refused


# ----------------------------------------------------------------------------- exports


def sampled_set(folder: Path, prompt_set: str, source: Path, answer) -> Path:
    """Answers to every prompt of a local prompt-set file, through `sample` (its meta.json included)."""
    prompts = load_prompts(prompt_set, path=str(source))
    meta = {"checkpoint": "m", "prompt_set": prompt_set, "prompts_path": str(source)}
    return sample(prompts, lambda conversations, settings: [answer(c) for c in conversations], GenerationSettings(batch_size=4),
                  folder, meta)


def test_alpaca_eval_export_has_every_instruction_in_order(tmp_path):
    from eval.export import export

    source = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Instruction {i}", "output": "reference", "generator": "davinci", "dataset": ["koala", "oasst"][i % 2]}
            for i in range(805)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = sampled_set(tmp_path / "samples", "alpaca_eval", source, lambda c: f"answer to {c[-1]['content']}")
    exported = json.loads(export(samples, "my-model").read_text())
    assert len(exported) == 805 and exported[0].keys() == {"instruction", "output", "generator", "dataset"}
    assert [row["instruction"] for row in exported] == [row["instruction"] for row in rows]
    assert exported[804] == {"instruction": "Instruction 804", "output": "answer to Instruction 804", "generator": "my-model",
                             "dataset": "koala"}
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:100] + lines[101:]) + "\n")  # one answer lost
    with pytest.raises(DataError, match="1 of the 805 alpaca_eval prompts have no answer .first: alpaca_eval-100"):
        export(samples, "my-model")


def test_mt_bench_export_in_fastchats_answer_format(tmp_path):
    from eval.export import export

    source = tmp_path / "question.jsonl"
    source.write_text("".join(json.dumps({"question_id": 81 + i, "category": "writing", "turns": [f"Q{i}a", f"Q{i}b"]}) + "\n"
                              for i in range(3)))
    samples = sampled_set(tmp_path / "samples", "mt_bench", source, lambda c: f"re {c[-1]['content']}")
    answers = [json.loads(line) for line in export(samples, "my-model").read_text().splitlines()]
    assert [answer["question_id"] for answer in answers] == [81, 82, 83]
    assert answers[1]["model_id"] == "my-model" and answers[1]["choices"] == [{"index": 0, "turns": ["re Q1a", "re Q1b"]}]
    assert answers[0].keys() == {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def test_vllm_sampling_without_vllm_is_a_clear_refusal(tmp_path):
    from eval.sampling import vllm_generator
    from utils import ConfigError

    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: this checks the refusal on machines without it")
    with pytest.raises(ConfigError, match=r"backend=vllm: vLLM is not installed \(pip install vllm"):
        vllm_generator(str(tmp_path))


# ----------------------------------------------------------------------------- the Open LLM Leaderboard through lm-eval


def test_leaderboard_scores_a_local_task_as_computed_by_hand(tmp_path, shared_cache):
    """A local multiple-choice task through the real CLI (lm-eval, offline): its accuracy equals the
    one computed here from the model's own log-likelihoods of each choice."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["model=tiny", f"cache_dir={shared_cache}", "+model.random_init.initializer_range=0.5"])
    tokenizer = train.load_tokenizer(cfg)
    model = train.load_policy(cfg, tokenizer).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    kinds = [("colour", ["blue", "green", "red"]), ("fruit", ["apple", "pear", "plum"]), ("animal", ["cat", "dog", "horse"]),
             ("city", ["Paris", "Rome", "Oslo"])] * 3
    docs = [{"question": f"Question {i}: name a {kind}.", "choices": choices, "answer": i % 3} for i, (kind, choices) in enumerate(kinds)]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "tasks" / "sums.yaml").write_text(
        f"task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tasks' / 'docs.jsonl'}\n"
        "test_split: test\nfewshot_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")

    def loglikelihood(context: str, continuation: str) -> float:  # lm-eval's split: the context's tokens, then the rest
        whole, head = tokenizer(context + continuation).input_ids, tokenizer(context).input_ids
        ids = torch.tensor([whole])
        with torch.no_grad():
            logps = model(ids[:, :-1]).logits.log_softmax(-1)[0]
        return sum(float(logps[position - 1, whole[position]]) for position in range(len(head), len(whole)))

    picked = [max(range(3), key=lambda k: loglikelihood(doc["question"], " " + doc["choices"][k])) for doc in docs]
    assert len(set(picked)) == 3  # the model's choices vary, so the score says which it picked
    expected = sum(pick == doc["answer"] for pick, doc in zip(picked, docs, strict=True)) / len(docs)
    task = (tmp_path / "tasks" / "sums.yaml").read_text()
    (tmp_path / "tasks" / "sums_again.yaml").write_text(task.replace("task: sums", "task: sums_again"))
    result = cli("eval.leaderboard", f"checkpoint={tmp_path / 'model'}", "tasks=[sums,sums_again]", f"include_path={tmp_path / 'tasks'}",
                 "+task_settings.sums={shots: 0, metric: acc}", "+task_settings.sums_again={shots: 1, metric: acc}",
                 f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert [(row["task"], row["shots"]) for row in board["tasks"]] == [("sums", 0), ("sums_again", 1)]
    assert board["tasks"][0]["score"] == pytest.approx(expected, abs=1e-9)
    assert board["average"] == pytest.approx((board["tasks"][0]["score"] + board["tasks"][1]["score"]) / 2)
    assert f"| sums | 0 | acc | {100 * expected:.2f} |" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_sample_cli_answers_a_datasets_held_out_split_without_a_run(tmp_path, shared_cache):
    result = cli("eval.sample", "model=tiny", "datasets=[demo]", "datasets.demo.test_size=6", "generation.max_new_tokens=2",
                 f"cache_dir={shared_cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_samples(tmp_path / "outputs" / "samples" / "tiny_heldout" / "samples.jsonl")
    expected = prompts_of(make_demo_pairs(6, seed=1, held_out=True))  # the demo loader's held-out split (its seed + 1)
    assert [(row["id"], row["prompt"], row["chosen"]) for row in rows.values()] == [(p.id, p.messages, p.chosen) for p in expected]
