"""What Hugging Face clients rely on beyond generate(): the old cache names (`past_key_values`, Mamba's
`cache_params`), caches built without the config or for another model, tuple outputs, static-cache generation of a
left-padded batch, classification from inputs_embeds, and the up-front refusal of assisted decoding for a stateful
model."""

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from hybrid_rnn_lm import HybridRnnLmForSequenceClassification, HybridRnnLmModel
from tests.test_modeling import (
    assert_batch_generates_what_each_prompt_generates_alone,
    left_padded_prompts,
    peaky_model,
    random_ids,
    tiny_config,
)


@pytest.mark.parametrize("old", ["past_key_values", "cache_params"])
def test_old_names_of_cache_are_accepted(old):
    model = peaky_model(tiny_config("gru", "every-2nd", num_hidden_layers=2))
    ids = random_ids(2, 9)
    with torch.no_grad():
        prefix = model(ids[:, :6], use_cache=True)
        expected = model(ids[:, 6:], cache=prefix.cache).logits
        again = model(ids[:, :6], use_cache=True)
        with pytest.warns(FutureWarning, match=old):
            old_name = model(ids[:, 6:], **{old: again.cache}).logits
        fresh = model(ids[:, 6:]).logits  # what a forward that ignored the cache would give
    torch.testing.assert_close(old_name, expected, atol=0, rtol=0)
    assert not torch.allclose(old_name, fresh, atol=1e-3)


@pytest.mark.parametrize("rnn_type", ["lstm", "mingru"])
def test_a_cache_built_without_the_config_is_given_this_models_layers(rnn_type):
    """`DynamicCache()` is how transformers' docs build a cache to reuse; without the config it has no layers and
    would fill with attention layers (an IndexError in the first recurrent block, as in transformers' Mamba)."""
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=3))
    ids = random_ids(2, 6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = DynamicCache()
    generated = model.generate(ids, cache=cache, **settings)
    assert torch.equal(generated, model.generate(ids, **settings))
    assert [cache.get_seq_length(index) for index in range(3)] == [6 + 8 - 1] * 3  # the caller's object was filled


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: DynamicCache(config=tiny_config("gru", "no-attention", num_hidden_layers=1)), id="1-block"
        ),
        pytest.param(lambda: DynamicCache(config=tiny_config("gru", "no-attention")), id="no-keys-and-values"),
        pytest.param(lambda: DynamicCache(config=GPT2Config(n_layer=2, n_embd=32, n_head=4)), id="transformer"),
    ],
)
def test_a_cache_for_another_model_is_refused_in_words(make):
    model = peaky_model(tiny_config("gru", "every-2nd", num_hidden_layers=2))
    with pytest.raises(ValueError) as error:
        model(random_ids(1, 5), cache=make(), use_cache=True)
    assert str(error.value) == (
        "the cache passed (DynamicCache) does not fit this model: it needs 2 layers, each holding a recurrent state, "
        "with keys and values in the attention blocks; build it with DynamicCache(config=model.config) or "
        "StaticCache(config=model.config, max_cache_len=...)"
    )


@pytest.mark.parametrize("where", ["argument", "config"])
def test_return_dict_false_gives_tuples(where):
    config = tiny_config("mingru", "every-2nd", num_hidden_layers=2, num_labels=3)
    if where == "config":
        config.return_dict = False
    kwargs = {"return_dict": False} if where == "argument" else {}
    torch.manual_seed(0)
    causal = peaky_model(config)
    ids = random_ids(2, 7)
    with torch.no_grad():
        reference = causal(ids, labels=ids, use_cache=True, return_dict=True)
        output = causal(ids, labels=ids, use_cache=True, **kwargs)
    assert isinstance(output, tuple)
    loss, logits, cache = output
    assert torch.equal(loss, reference.loss) and torch.equal(logits, reference.logits)
    assert cache.get_seq_length() == reference.cache.get_seq_length()

    base = HybridRnnLmModel(config).eval()
    classifier = HybridRnnLmForSequenceClassification(config).eval()
    with torch.no_grad():
        hidden = base(ids, use_cache=False, **kwargs)
        scores = classifier(ids, use_cache=False, **kwargs)
    assert isinstance(hidden, tuple) and hidden[0].shape == (2, 7, 32)
    assert isinstance(scores, tuple) and scores[0].shape == (2, 3)


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
@pytest.mark.parametrize("layout", ["no-attention", "all-attention", "every-2nd"])
def test_static_cache_left_padded_batch_generates_what_each_prompt_generates_alone(rnn_type, layout):
    model = peaky_model(tiny_config(rnn_type, layout, num_hidden_layers=2))
    assert_batch_generates_what_each_prompt_generates_alone(model, cache_implementation="static")


@pytest.mark.parametrize("rnn_type", ["gru", "mingru"])
def test_static_cache_left_padded_batch_under_torch_compile(rnn_type):
    """The same with the forward compiled (torch.compile, dynamic shapes; the eager backend needs no C++ compiler):
    the compiled, left-padded, static-cache batch generates what each prompt generates alone without compilation."""
    model = peaky_model(tiny_config(rnn_type, "every-2nd", num_hidden_layers=2))
    prompts, ids, mask = left_padded_prompts()
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    alone = [model.generate(prompt[None], **settings)[0, len(prompt) :] for prompt in prompts]
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", dynamic=True)
    batched = model.generate(ids, attention_mask=mask, cache_implementation="static", **settings)
    for row, expected in enumerate(alone):
        assert torch.equal(batched[row, ids.shape[1] :], expected), f"row {row} changed by padding under compile"


def test_assisted_decoding_is_refused_before_any_work():
    model = peaky_model(tiny_config("gru", "all-attention"))
    assistant = peaky_model(tiny_config("gru", "all-attention"), seed=1)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="stateful") as error:
        model.generate(random_ids(1, 4), assistant_model=assistant, max_new_tokens=4, do_sample=False)
    assert str(error.value).startswith("assisted generation") and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(random_ids(1, 4), prompt_lookup_num_tokens=2, max_new_tokens=4, do_sample=False)
    assert calls == []  # refused up front (transformers itself refused `_is_stateful` models before 5.25)

    # Nor can it draft for a transformer: the assistant's cache is cropped too.
    target = GPT2LMHeadModel(GPT2Config(vocab_size=model.config.vocab_size, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="cannot be the assistant_model") as error:
        target.generate(random_ids(1, 4), assistant_model=model, max_new_tokens=4, do_sample=False)
    assert "\n" not in str(error.value) and calls == []


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(0, 5, dtype=torch.long), "input_ids is empty (shape (0, 5)); pass at least one sequence"),
        (torch.zeros(2, 0, dtype=torch.long), "input_ids is empty (shape (2, 0))"),
        (torch.tensor([[1, 37]]), "input_ids holds token id 37, outside [0, vocab_size=37); the tokenizer"),
        (torch.tensor([[-1, 3]]), "input_ids holds token id -1, outside [0, vocab_size=37)"),
    ],
    ids=["empty-batch", "empty-sequence", "id-too-large", "negative-id"],
)
def test_bad_input_ids_are_a_clear_value_error(ids, message):
    model = peaky_model(tiny_config("gru", "every-2nd"))
    with pytest.raises(ValueError) as error:
        model(ids)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_torch_export_with_an_attention_mask_reproduces_the_logits():
    """The scan cells' padding is pure tensor algebra (no data-dependent branch), so the padded forward exports (through
    the traceable scan, equal to the fast one to float rounding)."""
    from tests.test_export import Logits

    model = peaky_model(tiny_config("mingru", "every-2nd"))
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    wrapped = Logits(model).eval()
    exported = torch.export.export(wrapped, (ids, mask))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, mask), wrapped(ids, mask), atol=1e-5, rtol=0)
        other = random_ids(2, 9, seed=5)  # other tokens and another padding through the same program
        other_mask = torch.ones_like(other)
        other_mask[1, :5] = 0
        torch.testing.assert_close(exported.module()(other, other_mask), wrapped(other, other_mask), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness and TRL, the real clients
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    from tests.test_train import tiny_options
    from training.arguments import arguments_from_dict
    from training.train import run_training

    folder = tmp_path_factory.mktemp("clients") / "run"
    torch.set_num_threads(1)
    run_training(*arguments_from_dict(tiny_options(folder, max_steps=12)))
    return folder


def test_lm_eval_rolling_loglikelihood_equals_the_streamed_evaluation(trained_folder):
    """lm-eval's HFLM scores a text after its prefix token (BOS, which is EOS here: what every document follows in
    training); `hybrid-lm eval`'s streamed evaluation (training.streams.evaluate_stream) reads the same
    tokens after the same EOS. With one block covering the text they agree to rounding."""
    import numpy as np
    from accelerate import Accelerator
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from training.data import load_corpus
    from training.generate import load_model_and_tokenizer
    from training.streams import evaluate_stream

    model, tokenizer = load_model_and_tokenizer(trained_folder)
    text = load_corpus("python-docs")["validation"][0]["text"][:400]
    harness = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1, device="cpu")
    assert harness.prefix_token_id == tokenizer.eos_token_id
    [total] = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = np.asarray(tokenizer(text)["input_ids"])
    ours = evaluate_stream(
        Accelerator(cpu=True), model, ids, block_size=len(ids) + 1, rows=1, eos_id=tokenizer.eos_token_id
    )
    assert ours["tokens"] == len(ids)
    assert -total / len(ids) == pytest.approx(ours["loss"], abs=1e-4)


def test_trl_sft_trainer_with_a_default_lora_config_trains_our_modules(trained_folder, tmp_path):
    """TRL's SFTTrainer + peft's LoraConfig() without target_modules: the default targets reach the recurrent, attention
    and MLP projections; only the adapters train; the merged model equals the adapted one."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(trained_folder)
    tokenizer = AutoTokenizer.from_pretrained(trained_folder)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = ["def add(a, b):\n    return a + b\n", "The for statement iterates over a sequence.\n"] * 4
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=64,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # float32 on CPU, so that merged and adapted logits compare tightly
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )
    trainer.train()
    adapted = trainer.model
    wrapped = {name.split(".lora_A")[0].split(".")[-1] for name, _ in adapted.named_parameters() if "lora_A" in name}
    assert {"in_proj", "out_proj", "q_proj", "up_proj"} & wrapped >= {"out_proj", "q_proj", "up_proj"}
    trainable = [name for name, parameter in adapted.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(
        torch.equal(parameter, before[name.replace("base_model.model.", "").replace(".base_layer", "")])
        for name, parameter in adapted.named_parameters()
        if "lora_" not in name and name.replace("base_model.model.", "").replace(".base_layer", "") in before
    )
    ids = torch.tensor([tokenizer("def add(a, b):")["input_ids"]])
    adapted.eval()
    with torch.no_grad():
        adapted_logits = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, adapted_logits, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(trained_folder)(ids).logits, adapted_logits)


def test_classification_from_inputs_embeds_reads_every_rows_last_position():
    """As in-library classifiers do: with a pad id but only embeddings, each row's last position is classified (a
    warning says that padding cannot be seen), the same as from unpadded ids."""
    torch.manual_seed(0)
    model = HybridRnnLmForSequenceClassification(tiny_config("mingru", "every-2nd", num_labels=3)).eval()
    ids = random_ids(2, 7)  # ids from 3 up: no pad token (0) in the rows
    with torch.no_grad():
        expected = model(ids).logits
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(embedded, expected, atol=1e-6, rtol=0)
