"""Bad input to the `m1` commands: one line naming the option or file and the fix, before any model is loaded;
and nothing left behind by an interrupted write. The cases and their lines are listed in docs/bad_input.md."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from m1_plugins.cli import main
from m1_plugins.utils import atomic_output_dir


def m1(*args, **env):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def one_line_error(result, exit_code: int = 1) -> str:
    """The error line of a refused command (click prints usage lines before it for a bad option)."""
    assert result.exit_code == exit_code, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def tiny_llama_dir(tmp_path):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.fixture
def tiny_m1_dir(tmp_path, make_model):
    """A tiny M1 model (max length 256) with a word-level tokenizer and a chat template: no real tokenizer needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>", "user", "assistant", "word"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        chat_template="{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant")
    make_model(eos_token_id=2).save_pretrained(tmp_path / "m1")
    tokenizer.save_pretrained(tmp_path / "m1")
    return tmp_path / "m1"


# --- silently wrong before: now refused ---------------------------------------------------------------------------

def test_convert_refuses_an_empty_layer_list(tiny_llama_dir, tmp_path):
    result = m1("convert", "--teacher", tiny_llama_dir, "--out", tmp_path / "h", "--attn-layers", "")
    assert one_line_error(result, 2) == ("Error: Invalid value for '--attn-layers': no layer given; for an all-Mamba "
                                         "model pass --num-attn-layers 0 instead.")
    assert not (tmp_path / "h").exists()


def test_generate_refuses_a_prompt_beyond_the_model_length(tiny_m1_dir):
    result = m1("generate", "--model", tiny_m1_dir, "--prompt", "word " * 300, "--max-tokens", 8)  # + "user", "assistant"
    assert one_line_error(result, 2) == (
        "Error: Invalid value for --prompt: the longest prompt (302 tokens) + --max-tokens (8) exceeds the model's "
        "max length (256 tokens): shorten the prompt or lower --max-tokens.")


# --- one line instead of a traceback -------------------------------------------------------------------------------

def test_teacher_refuses_an_existing_out_before_loading(tmp_path, monkeypatch):
    import m1_plugins.teacher

    def never(*args, **kwargs):
        raise AssertionError("the GGUF was read before the output path was checked")

    monkeypatch.setattr(m1_plugins.teacher, "load_gguf_teacher", never)
    (tmp_path / "t").mkdir()
    result = m1("teacher", "--out", tmp_path / "t")
    assert result.output == f"Error: {tmp_path / 't'} already exists; choose another path or pass --overwrite to replace it.\n"
    assert result.exit_code == 1
    for verbose in (m1("--verbose", "teacher", "--out", tmp_path / "t"), m1("teacher", "--out", tmp_path / "t", M1_VERBOSE="1")):
        assert isinstance(verbose.exception, FileExistsError)  # the traceback is there on request


def test_data_names_unknown_tasks_and_leaves_no_partial_file(tmp_path, monkeypatch):
    line = one_line_error(m1("data", "--task", "gsm_symbolc", "--out", tmp_path / "d.jsonl"), 2)
    assert line.startswith("Error: Invalid value for --task: unknown reasoning-gym task 'gsm_symbolc': did you mean "
                           "gsm_symbolic? tasks: ab, acre, ")
    import m1_plugins.data

    def failing(task, size, seed):
        yield [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        raise ValueError("the task's generator failed")

    monkeypatch.setattr(m1_plugins.data, "reasoning_gym_conversations", failing)
    result = m1("data", "--task", "gsm_symbolic", "--out", tmp_path / "d.jsonl")
    assert one_line_error(result) == "Error: the task's generator failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, line", [
    (["--batch-sizes", "0,-1,2,x"],
     "Error: Invalid value for --batch-sizes: expected comma-separated positive integers such as 8,16,32, got '0,-1,2,x'"),
    (["--gen-lens", "4,0"],
     "Error: Invalid value for --gen-lens: expected comma-separated positive integers such as 8,16,32, got '4,0'"),
    (["--gen-len", "0"], "Error: Invalid value for '--gen-len': 0 is not in the range x>=1."),
    (["--repeats", "0"], "Error: Invalid value for '--repeats': 0 is not in the range x>=1."),
])
def test_bench_refuses_bad_sizes(args, line):
    assert one_line_error(m1("bench", "--tiny", *args), 2) == line


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1 + 1?", "answer": "2"}\n')
    return path


@pytest.mark.parametrize("spec, message", [
    ("rg:gsm_symbolic,size=abc", "rg:gsm_symbolic,size=abc: size=abc must be an integer."),
    ("rg:gsm_symbolic,sz=2", "rg:gsm_symbolic,sz=2: gsm_symbolic has no option 'sz'; did you mean size? options: "
                             "difficulty, seed, size."),
    ("rg:gsm_symbolic,size=0", "rg:gsm_symbolic,size=0: size=0 must be a positive integer (the number of problems)."),
    ("rg:basic_arithmetic,min_terms=0", "rg:basic_arithmetic,min_terms=0: basic_arithmetic refuses these options "
                                        "(min_terms must be positive)."),
    ("rg:gsm_symbolic,difficulty=2", "rg:gsm_symbolic,difficulty=2: gsm_symbolic refuses these options (assert 1.0 <= "
                                     "self.difficulty <= 1.0  # currently only difficulty 1.0 is supported)."),
])
def test_eval_refuses_bad_benchmark_options(spec, message, problems_file, tmp_path):
    result = m1("eval", "--model", tmp_path, "--benchmark", spec, "--out", tmp_path / "out")
    assert one_line_error(result, 2) == f"Error: Invalid value for --benchmark: {message}"


def test_eval_names_the_bad_line_of_a_jsonl(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1 + 1?", "answer": "2"}\n\n{"problem": oops}\n')
    result = m1("eval", "--model", tmp_path, "--benchmark", path, "--out", tmp_path / "out")
    assert one_line_error(result, 2) == (f"Error: Invalid value for --benchmark: {path} line 3 is not valid JSON "
                                         "(Expecting value, column 13): one object per line.")


def test_eval_checks_n_and_the_models_before_loading(problems_file, tmp_path):
    result = m1("eval", "--model", tmp_path, "--benchmark", problems_file, "--n", 8, "--batch-size", 4,
                "--out", tmp_path / "out")
    assert one_line_error(result, 2) == ("Error: Invalid value for --n: --n 8 samples per problem do not fit in "
                                         "--batch-size 4: raise --batch-size to at least 8 or lower --n.")
    (tmp_path / "empty").mkdir()
    result = m1("eval", "--model", tmp_path / "empty", "--benchmark", problems_file, "--out", tmp_path / "out")
    assert one_line_error(result) == (f"Error: {tmp_path / 'empty'} has no config.json: not a model checkpoint. Write "
                                      "one with `m1 teacher` or `m1 convert`, or pass the directory that holds config.json.")


def test_report_refuses_an_empty_student_dir(tiny_llama_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    result = m1("report", "--teacher", tiny_llama_dir, "--student", tmp_path / "empty", "--max-new-tokens", 0)
    assert one_line_error(result).startswith(f"Error: {tmp_path / 'empty'} has no config.json: not a model checkpoint.")


def test_a_truncated_safetensors_is_named(tiny_m1_dir):
    weights = tiny_m1_dir / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    result = m1("generate", "--model", tiny_m1_dir, "--prompt", "word")
    assert one_line_error(result) == (f"Error: {weights} is truncated or corrupted ({size // 2:,} bytes, its header "
                                      f"describes {size:,}): copy or write it again.")
    weights.write_bytes(b"not a safetensors file")
    assert "no valid header" in one_line_error(m1("generate", "--model", tiny_m1_dir, "--prompt", "word"))


def test_plain_transformers_loads_a_checkpoint_once_m1_plugins_is_imported(tiny_m1_dir):
    """What docs/bad_input.md says: transformers alone does not know m1_hybrid; `import m1_plugins` registers it."""
    load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tiny_m1_dir)!r})"
    alone = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert alone.returncode != 0 and "model type `m1_hybrid` but Transformers does not recognize" in alone.stderr
    imported = subprocess.run([sys.executable, "-c", f"import m1_plugins; {load}"], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr


# --- nothing left behind --------------------------------------------------------------------------------------------

def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such process
    old = tmp_path / ".out.tmp-xyz"  # written before temp names carried a pid
    live = tmp_path / f".out.tmp-{os.getpid()}-def"  # a run still writing
    other = tmp_path / ".other.tmp-999999999-abc"  # another output's
    for d in (dead, old, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1000)
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])


def test_sigterm_runs_the_cleanup(tmp_path):
    script = ("import sys, time; from m1_plugins.utils import atomic_output_dir, exit_on_sigterm; exit_on_sigterm()\n"
              "with atomic_output_dir(sys.argv[1]) as tmp:\n    (tmp / 'partial').write_text('x'); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*/partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
