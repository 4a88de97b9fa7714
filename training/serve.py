"""`hybrid-lm serve MODEL`: transformers' OpenAI-compatible server (`transformers serve`) for a saved model folder.

    hybrid-lm serve runs/shakespeare --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "runs/shakespeare", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.8, "stream": true}'

`transformers serve` builds a model from the class named in config.json's `architectures`, looked up on the
`transformers` module, in a process of its own, so by itself it loads this package's folders only by running their
code (`--trust-remote-code`). This command makes the installed package's classes available there, in the server's
process and in the model's (through its loader), and runs the same server with the folder preloaded: /v1/completions
(streamed or not, temperature, top_p, max_tokens, seed, stop), /v1/chat/completions for models with a chat template,
/v1/models.
Needs the serving extras: pip install 'transformers[serving]'.
"""

from dataclasses import dataclass

from training.arguments import arg, check_seed, check_types
from training.errors import UserError
from training.generate import check_model_folder, load_model_and_tokenizer, parse_command


@dataclass
class ServeArguments:
    """Which model, where to listen."""

    model: str = arg(help="a saved model folder (output of `hybrid-lm train` or save_pretrained)")
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = arg(8000, "port to listen on")
    device: str = arg("auto", "device of the model: auto, cpu, cuda, cuda:0, ...")
    dtype: str = arg("auto", "dtype of the model: auto (as saved), float32, bfloat16, float16")
    log_level: str = arg("warning", "server log level: debug, info, warning, error")
    seed: int | None = arg(None, "default torch seed of sampled completions (a request's own seed wins)")

    def __post_init__(self):
        check_types(self)
        check_seed(self.seed)
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in [0, 65535], got {self.port}")


def prepare_for_serving(model):
    """The loaded model as the server runs it (`training.serve_loader` calls this on every model it loads).

    It samples as the OpenAI API does (at the request's temperature, 1 by default; temperature 0 is greedy): a saved
    generation_config keeps do_sample off, and the server only ever switches sampling off, so without this every
    completion would be greedy. An empty prompt starts a new document, as in the OpenAI API and `hybrid-lm generate`:
    `generate` continues from one EOS token (what precedes every document in training) and returns the new tokens
    alone, so the server's prompt length (0) and its streamer (which skips the first tokens it is given, the prompt)
    see the same thing as for any other prompt. A model without an EOS token keeps its own error for empty input.
    Only this instance changes: the hybrid's and transformers' GPT-2 classes stay as they are."""
    import torch

    if not callable(getattr(model, "generate", None)) or getattr(model, "generation_config", None) is None:
        return model
    model.generation_config.do_sample = True
    generate = model.generate  # the class's, bound to this model

    def generate_new_document_on_empty_prompt(input_ids=None, attention_mask=None, **kwargs):
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if input_ids is None or input_ids.shape[-1] > 0 or not isinstance(eos, int):
            return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        start = input_ids.new_full((input_ids.shape[0], 1), eos)
        output = generate(input_ids=start, attention_mask=torch.ones_like(start), **kwargs)
        if isinstance(output, torch.Tensor):
            return output[:, 1:]
        output.sequences = output.sequences[:, 1:]
        return output

    model.generate = generate_new_document_on_empty_prompt
    return model


def make_classes_available() -> list[str]:
    """Registers this package's model classes as attributes of `transformers`, where the server looks them up."""
    import sys

    from transformers.cli.serving import model_manager

    import hybrid_rnn_lm

    # transformers.processing_utils imports the package a second time when it is first imported, so `transformers` can
    # be two module objects in one process: the one in sys.modules now and the one the server imported before.
    modules = {id(module): module for module in (sys.modules["transformers"], model_manager.transformers)}
    names = [name for name in hybrid_rnn_lm.__all__ if name.startswith("HybridRnnLm")]
    for module in modules.values():
        for name in names:
            setattr(module, name, getattr(hybrid_rnn_lm, name))
    return names


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):  # `hybrid-lm serve FOLDER`, as `transformers serve MODEL`
        argv = ["--model", *argv]
    args = parse_command(
        ServeArguments, argv, "hybrid-lm serve", "Serve a saved model over an OpenAI-compatible HTTP API."
    )
    folder = check_model_folder(args.model)
    # The checks of every command that reads a model (a causal LM, whole weights, a tokenizer that fits), on the meta
    # device: no weight is read here; the server loads the model in a process of its own.
    load_model_and_tokenizer(folder, device_map="meta")
    from transformers.utils import is_serve_available

    if not is_serve_available():
        raise UserError("serving needs FastAPI, uvicorn and openai: pip install 'transformers[serving]'")
    make_classes_available()
    from transformers.cli import serve
    from transformers.cli.serving import model_manager

    from training.serve_loader import HybridLmModelLoader

    model_manager.ModelLoader = HybridLmModelLoader  # what Serve builds its loader from

    print(f"serving {folder} on http://{args.host}:{args.port}/v1 (model name: {folder}); Ctrl-C stops", flush=True)
    serve.Serve(
        force_model=str(folder),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        log_level=args.log_level,
        default_seed=args.seed,
    )
    return 0
