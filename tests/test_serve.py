"""hybrid-lm serve: transformers' OpenAI-compatible server for a saved folder, spoken to over plain HTTP on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.test_generate_cli import error_line, run_cli
from tests.test_train import REPO_ROOT
from training.generate import load_model_and_tokenizer

PROMPT = "def "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


@pytest.fixture(scope="module", params=["hybrid", "gpt2"])
def server(request, tmp_path_factory):
    """A served output folder of `hybrid-lm train`: the hybrid, and a GPT-2 baseline (transformers' own class)."""
    from tests.test_train import tiny_options
    from training.arguments import arguments_from_dict
    from training.train import run_training

    folder = tmp_path_factory.mktemp("serve") / "model"
    torch.set_num_threads(1)
    run_training(*arguments_from_dict(tiny_options(folder, max_steps=40, architecture=request.param)))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "serve", str(folder), "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as response:
                models = json.loads(response.read())
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the server did not start within 180 s"
            time.sleep(0.5)
    yield base, folder, models
    process.terminate()
    process.wait(timeout=30)


def greedy_text(folder, prompt: str, tokens: int) -> str:
    model, tokenizer = load_model_and_tokenizer(folder)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_folder_is_the_served_model(server):
    _, folder, models = server
    assert [model["id"] for model in models["data"]] == [str(folder)]


def test_a_greedy_completion_is_what_generate_gives(server):
    base, folder, _ = server
    reply = json.loads(
        post(f"{base}/completions", {"model": str(folder), "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    )
    [choice] = reply["choices"]
    assert choice["text"] == greedy_text(folder, PROMPT, 24)
    assert reply["usage"]["completion_tokens"] == 24


def test_a_streamed_completion_sends_the_same_text_in_pieces(server):
    base, folder, _ = server
    body = {"model": str(folder), "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    events = [
        line[len("data: ") :]
        for line in post(f"{base}/completions", body).decode().splitlines()
        if line.startswith("data: ")
    ]
    chunks = [json.loads(event) for event in events if event.strip() != "[DONE]"]
    assert len(chunks) > 2  # streamed, not one piece
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == greedy_text(folder, PROMPT, 16)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_an_empty_prompt_starts_a_new_document(server):
    """As in the OpenAI API and `hybrid-lm generate --prompt ""`: the text continues from one EOS token, what precedes
    every training document, and that token is neither returned nor counted as the prompt."""
    base, folder, _ = server
    model, tokenizer = load_model_and_tokenizer(folder)
    with torch.no_grad():
        output = model.generate(torch.tensor([[tokenizer.eos_token_id]]), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(output[0, 1:], skip_special_tokens=True)
    for prompt in ({"prompt": ""}, {}):  # empty, and left out
        reply = json.loads(
            post(f"{base}/completions", {"model": str(folder), "max_tokens": 12, "temperature": 0, **prompt})
        )
        assert reply["choices"][0]["text"] == expected
        new_tokens = output.shape[1] - 1
        counts = [reply["usage"][name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")]
        assert counts == [0, new_tokens, new_tokens]
    body = {"model": str(folder), "prompt": "", "max_tokens": 12, "temperature": 0, "stream": True}
    lines = post(f"{base}/completions", body).decode().splitlines()
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    chunks = [json.loads(event) for event in events if event.strip() != "[DONE]"]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected


def test_sampling_parameters_are_honoured(server):
    base, folder, _ = server

    def sample(seed: int, **extra) -> dict:
        body = {"model": str(folder), "prompt": PROMPT, "max_tokens": 20, "temperature": 1.5, "seed": seed, **extra}
        return json.loads(post(f"{base}/completions", body))

    first, again, other = sample(7), sample(7), sample(8)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # the seed is used
    assert first["choices"][0]["text"] != other["choices"][0]["text"]
    assert first["choices"][0]["text"] != greedy_text(folder, PROMPT, 20)  # temperature > 0 samples
    assert sample(7, max_tokens=5)["usage"]["completion_tokens"] == 5


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", str(tmp_path / "missing"))
    assert code == 2
    assert "missing" in error_line(err)


def test_a_folder_whose_weights_lack_a_tensor_is_refused_before_the_server_starts(tmp_path, capsys):
    from tests.test_generate_cli import save_tiny_model
    from tests.test_hardening import drop_tensor

    folder = save_tiny_model(tmp_path / "model")
    drop_tensor(folder / "model.safetensors", "model.layers.0.rnn.out_proj.bias")
    code, out, err = run_cli(capsys, "serve", str(folder))
    assert code == 2 and "serving" not in out
    assert error_line(err) == (
        f"error: {folder}: the saved weights lack 1 of the model's tensors (model.layers.0.rnn.out_proj.bias), which "
        "would start from random values; save the model again"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
    ],
    ids=["negative-seed", "port-out-of-range"],
)
def test_bad_options_are_one_line_before_the_model_loads(tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, "serve", str(tmp_path / "missing"), *flags)
    assert code == 2
    assert message in error_line(err)
