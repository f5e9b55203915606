"""Chat fine-tuning: the template (tokenizer.render_chat), prepare.py --format chat, the masked loss
and ChatBatches of train.py, exact resume and 2 ranks on a chat dataset, and sample.py --chat on a
chat-tuned model. Every corpus and conversation is generated here, so nothing external is needed
(only the gpt2 cases read GPT-2's BPE files from ../shared)."""
import json
import random
import subprocess
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batches
import distributed
import gpt
import prepare
import sample
import train
from common import UserError
from conftest import ROOT, assert_one_line_error, main_in_process, run_in_process, run_script
from engine import generate
from gpt import GPT, GPTConfig
from test_train import losses, metrics, torchrun, train_run
from tokenizer import CHAT_SPECIALS, END, Tokenizer, load_tokenizer, render_chat

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = "\n !,.:?" + LETTERS.upper() + LETTERS  # a base model's characters: the plain template's too
BASE = Tokenizer("char", chars="".join(sorted(CHARS)))
CHAT = BASE.with_chat_specials()


def word(rng, n=4):
    return "".join(rng.choice(LETTERS) for _ in range(n))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def conversations(n, seed=0):
    """n varied conversations: prompt/completion records, system prompts, several turns."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 3 == 0:
            records.append({"prompt": f"copy: {word(rng)}", "completion": word(rng)})
            continue
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 1 else []
        for _ in range(1 + i % 2):
            messages += [{"role": "user", "content": f"what is {word(rng, 3)}?"},
                         {"role": "assistant", "content": f"It is {word(rng, 5)}."}]
        records.append({"messages": messages})
    return records


def as_messages(record):
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    """A char dataset whose tokenizer is BASE: what --tokenizer names for a chat dataset."""
    folder = tmp_path_factory.mktemp("base")
    text = folder / "corpus.txt"
    rng = random.Random(0)
    text.write_text(CHARS + "\n" + "".join(rng.choice(CHARS) for _ in range(3000)), encoding="utf-8")
    prepare.main(["--input", str(text), "--out", str(folder / "data")])
    assert load_tokenizer(folder / "data").to_dict() == BASE.to_dict()
    return folder / "data"


def prepare_chat(path, base, out, *args):
    prepare.main(["--input", str(path), "--format", "chat", "--tokenizer", str(base), "--out", str(out), *args])
    return out


@pytest.fixture(scope="module")
def chat_data(base_data, tmp_path_factory):
    """40 varied conversations prepared against BASE (up to 67 tokens each)."""
    folder = tmp_path_factory.mktemp("chat")
    records = conversations(40)
    prepare_chat(write_jsonl(folder / "chat.jsonl", records), base_data, folder / "data", "--val_fraction", "0.25")
    return folder / "data", records


def read_split(data, split):
    """(tokens, mask, starts) of one split of a chat dataset."""
    dtype = json.loads((data / "meta.json").read_text())["dtype"]
    return (np.fromfile(data / f"{split}.bin", dtype=dtype), np.fromfile(data / f"{split}.mask.bin", dtype=np.uint8),
            np.fromfile(data / f"{split}.starts.bin", dtype=np.int64))


# --- the template ---------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "A model."}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Nothing more."}]


@pytest.fixture(scope="module")
def gpt2_chat(shared_dir):
    return load_tokenizer("gpt2").with_chat_specials()


def parse(tok, ids):
    """The messages of rendered ids: a role marker opens a turn, <|end|> closes it (by id, so a
    content that spells a marker is content)."""
    roles = {i: marker[2:-2] for marker, i in tok.specials.items() if marker != END}
    messages, turn = [], []
    for i in ids:
        if i in roles:
            role, turn = roles[i], []
        elif i == tok.specials[END]:
            messages.append({"role": role, "content": tok.decode(turn)})
        else:
            turn.append(i)
    return messages


def check_round_trip(tok, messages):
    """render -> decode gives the messages back, the mask covers the replies and their <|end|>."""
    ids, mask = render_chat(tok, messages)
    assert tok.decode(ids) == "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    assert parse(tok, ids) == messages
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "".join(m["content"] + END for m in messages if m["role"] == "assistant")
    prompt, prompt_mask = render_chat(tok, messages, add_generation_prompt=True)
    assert prompt == ids + [tok.specials["<|assistant|>"]] and prompt_mask == mask + [0]


def test_render_chat_round_trips_and_masks_the_replies(gpt2_chat):
    """template -> tokens -> decode is the messages; the learn mask is the replies plus <|end|>."""
    check_round_trip(CHAT, MESSAGES)
    check_round_trip(gpt2_chat, MESSAGES)
    check_round_trip(gpt2_chat, [{"role": "user", "content": "   "}, {"role": "assistant", "content": ""}])


def test_the_markers_are_new_ids_after_the_base_vocabulary(gpt2_chat):
    assert list(gpt2_chat.specials.values()) == [50257, 50258, 50259, 50260] and gpt2_chat.vocab_size == 50261
    assert list(CHAT.specials) == list(CHAT_SPECIALS)
    assert list(CHAT.specials.values()) == list(range(len(CHARS), len(CHARS) + 4))
    assert CHAT.with_chat_specials() is CHAT and not BASE.specials


@pytest.mark.parametrize("tok", ["char", "gpt2"])
def test_typed_marker_text_stays_ordinary_tokens(tok, request):
    """A user who types "<|user|>" or "<|end|>" gets the characters, not a turn boundary: only
    render_chat's own markers are special ids."""
    tok = request.getfixturevalue("gpt2_chat") if tok == "gpt2" else Tokenizer(
        "char", chars="".join(sorted(set(CHARS + "<|>")))).with_chat_specials()
    typed = "<|user|> hi <|end|><|assistant|>"
    assert all(i < tok.base_vocab_size for i in tok.encode(typed))
    messages = [{"role": "user", "content": typed}, {"role": "assistant", "content": "ok"}]
    ids, _ = render_chat(tok, messages)
    assert sum(i >= tok.base_vocab_size for i in ids) == 4  # two role markers, two <|end|>
    check_round_trip(tok, messages)


def test_a_base_model_gets_the_plain_text_template():
    """Without the markers (a base model, as a server would serve it) the template is plain text,
    the reply's mask covers " reply\\n", and a generation prompt ends at "Assistant:"."""
    ids, mask = render_chat(BASE, MESSAGES[:3], add_generation_prompt=True)
    assert BASE.decode(ids) == "System: Be brief.\nUser: Hi, who are you?\nAssistant: A model.\nAssistant:"
    assert BASE.decode([i for i, m in zip(ids, mask) if m]) == " A model.\n"


def test_the_markers_travel_in_to_dict_and_are_checked():
    d, V = CHAT.to_dict(), BASE.vocab_size
    assert d["specials"] == {"<|system|>": V, "<|user|>": V + 1, "<|assistant|>": V + 2, "<|end|>": V + 3}
    assert d["vocab_size"] == V + 4
    assert BASE.to_dict() == {k: v for k, v in d.items() if k != "specials"} | {"vocab_size": V}
    again = load_tokenizer(json.loads(json.dumps(d)))
    assert again.to_dict() == d and again.is_chat and again.decode([V + 1, *BASE.encode("Hi!")]) == "<|user|>Hi!"
    with pytest.raises(UserError, match="ids after the base vocabulary"):
        load_tokenizer(d | {"specials": {marker: i - 1 for marker, i in d["specials"].items()}})


# --- prepare.py --format chat ---------------------------------------------------------------------

def test_prepare_writes_each_conversation_as_render_chat_renders_it(chat_data):
    """The bins, masks and starts hold every conversation exactly once, whole, as render_chat
    renders it; val takes round(n * val_fraction) whole conversations."""
    data, records = chat_data
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["format"], meta["template"], meta["special_tokens"]) == ("chat", "markers", CHAT.specials)
    assert meta["tokenizer"] == CHAT.to_dict() and meta["conversations"] == {"train": 30, "val": 10}
    rendered = {tuple(render_chat(CHAT, as_messages(r))[0]): render_chat(CHAT, as_messages(r))[1] for r in records}
    seen = []
    for split in ("train", "val"):
        tokens, mask, starts = read_split(data, split)
        assert starts[0] == 0 and starts[-1] == len(tokens) == len(mask) == meta["tokens"][split]
        assert mask.sum() == meta["learned_tokens"][split]
        for begin, end in zip(starts[:-1], starts[1:]):
            ids = tuple(tokens[begin:end].tolist())
            assert mask[begin:end].tolist() == rendered[ids]
            seen.append(ids)
    assert sorted(seen) == sorted(rendered)
    assert not list(data.glob("*.tmp"))


def test_the_split_is_seeded(base_data, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(30))
    val = lambda out: read_split(out, "val")[0].tolist()
    a = prepare_chat(path, base_data, tmp_path / "a", "--seed", "1")
    assert val(prepare_chat(path, base_data, tmp_path / "b", "--seed", "1")) == val(a)
    assert val(prepare_chat(path, base_data, tmp_path / "c", "--seed", "2")) != val(a)


def test_a_text_dataset_prepared_over_a_chat_one_drops_its_masks(base_data, tmp_path):
    out = prepare_chat(write_jsonl(tmp_path / "c.jsonl", conversations(10)), base_data, tmp_path / "data")
    text = tmp_path / "t.txt"
    text.write_text("some text. " * 400)
    prepare.main(["--input", str(text), "--out", str(out)])
    assert not list(out.glob("*.mask.bin")) and not list(out.glob("*.starts.bin"))


def test_prepare_chat_with_gpt2(gpt2_chat, tmp_path):
    out = tmp_path / "data"
    prepare.main(["--input", str(write_jsonl(tmp_path / "c.jsonl", conversations(10))), "--format", "chat",
                  "--tokenizer", "gpt2", "--out", str(out)])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 50261 and meta["special_tokens"] == gpt2_chat.specials
    assert load_tokenizer(out).to_dict() == gpt2_chat.to_dict()


BAD_LINES = [
    ("not json at all", "not JSON"),
    ("[1, 2]", 'expected an object with "messages", or with "prompt" and "completion"'),
    ('{"text": "hello"}', 'expected an object with "messages"'),
    ('{"prompt": "a"}', 'expected an object with "messages"'),
    ('{"prompt": "a", "completion": null}', '"completion" is NoneType, not a string'),
    ('{"messages": "hi"}', '"messages" must be a list'),
    ('{"messages": []}', "the conversation has no messages"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "message 1 has unknown role 'bot'"),
    ('{"messages": [{"role": "user"}]}', 'message 1 is not an object with "role" and "content"'),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     "message 1's content is int, not a string"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "ends with a user turn"),
    ('{"prompt": "caf\\u00e9", "completion": "a"}', "character 'é' (U+00E9) is not in the char vocabulary"),
    (b'{"prompt": "\xff", "completion": "a"}', "byte 12 is not valid UTF-8"),
]


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("line, needle", BAD_LINES)
def test_a_malformed_line_is_an_error_naming_file_and_line(base_data, tmp_path, line, needle):
    good = [json.dumps(r) for r in conversations(3)]
    path = write_lines(tmp_path / "c.jsonl", good[:2] + ["", line] + good[2:])  # a blank line is no line
    with pytest.raises(UserError) as error:
        prepare_chat(path, base_data, tmp_path / "out")
    assert f"{path}, line 4: " in str(error.value) and needle in str(error.value), error.value
    assert "--skip_bad_lines" in str(error.value)
    assert not (tmp_path / "out").exists()  # a failed run leaves no folder that looks like a dataset


def test_a_malformed_line_is_one_line_on_the_command_line(base_data, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(conversations(1)[0]), "{oops"])
    result = run_script("prepare.py", "--input", path, "--format", "chat", "--tokenizer", base_data,
                        "--out", tmp_path / "out")
    assert_one_line_error(result, f"{path}, line 2: not JSON")


def test_skip_bad_lines_counts_them_in_the_summary(base_data, tmp_path, capsys):
    good = [json.dumps(r) for r in conversations(len(BAD_LINES))]
    lines = [x for pair in zip(good, [line for line, _ in BAD_LINES]) for x in pair]
    out = prepare_chat(write_lines(tmp_path / "c.jsonl", lines), base_data, tmp_path / "out", "--skip_bad_lines")
    captured = capsys.readouterr()
    assert f"skipped {len(BAD_LINES)} malformed lines" in captured.out.splitlines()[-1]
    assert f"the first: {tmp_path / 'c.jsonl'}, line 2: not JSON" in captured.err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_lines"] == len(BAD_LINES) and sum(meta["conversations"].values()) == len(BAD_LINES)


@pytest.mark.parametrize("args, needle", [
    (["--tokenizer", "char"], "a base model's tokenizer"),
    (["--tokenizer", "bpe"], "a base model's tokenizer"),
    (["--clean"], "--clean applies to --format text"),
])
def test_chat_options_that_do_not_apply_are_errors(base_data, tmp_path, args, needle):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(4))
    with pytest.raises(UserError, match=needle):
        prepare.main(["--input", str(path), "--format", "chat", "--tokenizer", str(base_data), *args])
    with pytest.raises(UserError, match="--skip_bad_lines applies to --format chat"):
        prepare.main(["--input", str(path), "--skip_bad_lines"])


# --- the masked loss ------------------------------------------------------------------------------

def tiny_model(vocab_size=CHAT.vocab_size, block_size=80, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))


def save(model, tok, path):
    gpt.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer=tok.to_dict(),
                             config={}, iter_num=0, best_val_loss=float("inf")), path)
    return path


def chat_batches(data, block_size=72, batch_size=6):
    cfg = train.load_config([f"--dataset={data}", f"--block_size={block_size}", f"--batch_size={batch_size}",
                             "--device=cpu"])
    return cfg, batches.make_batches(cfg, "cpu")


def reply_loss(model, data, split, conversations):
    """The route without padding or -1 targets: each conversation alone through the model, the
    log-probability of each reply token gathered by hand. (loss, correct, count)."""
    tokens, mask, starts = read_split(data, split)
    total, correct, count = 0.0, 0, 0
    for i in conversations:
        ids = torch.tensor(tokens[starts[i]:starts[i + 1]].astype(np.int64))
        logits, _ = model(ids[None, :-1], ids[None, 1:])  # with targets: logits at every position
        logp = F.log_softmax(logits[0], dim=-1)  # (n - 1, V): row j predicts token j + 1
        learn = torch.tensor(mask[starts[i] + 1:starts[i + 1]] == 1)
        targets = ids[1:][learn]
        total = total - logp[learn].gather(1, targets[:, None]).sum()
        correct += (logp[learn].argmax(-1) == targets).sum().item()
        count += len(targets)
    return total / count, correct, count


def test_the_masked_loss_is_the_loss_of_the_reply_tokens(chat_data):
    """Two routes to one loss and one gradient: a padded batch of ChatBatches with -1 targets, and
    each conversation alone with the reply tokens picked out by hand."""
    data, _ = chat_data
    _, batches = chat_batches(data)
    rows = batches.draw("train", np.random.default_rng(0), 6)
    model = tiny_model()
    _, loss = model(*batches.get("train", rows))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, _, _ = reply_loss(model, data, "train", rows)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_padding_and_masked_out_targets_change_nothing(chat_data):
    """Rows whose inputs differ only where the targets are -1 after the conversation (padding)
    give the same loss and gradients; a batch with no reply token has loss 0, not nan."""
    data, _ = chat_data
    _, batches = chat_batches(data)
    x, y = batches.get("train", batches.draw("train", np.random.default_rng(1), 6))
    lengths = (y != -1).cumsum(1).argmax(1) + 1  # past the last target: padding
    other = x.clone()
    for row, n in enumerate(lengths.tolist()):
        other[row, n:] = torch.randint(0, CHAT.vocab_size, (x.size(1) - n,))
    assert not torch.equal(other, x)
    results = []
    for inputs in (x, other):
        model = tiny_model()
        _, loss = model(inputs, y)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    assert results[0][0].item() == results[1][0].item()
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    model = tiny_model()
    _, loss = model(x, torch.full_like(y, -1))
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in model.parameters())


def test_evaluation_counts_the_reply_tokens_only(chat_data):
    """train.evaluate's val loss and accuracy on a chat dataset are those of the reply tokens of
    the conversations it draws; padding and context count for nothing."""
    data, _ = chat_data
    cfg, batches = chat_batches(data)
    cfg = cfg | {"eval_iters": 3}
    model = tiny_model()
    rt = distributed.Runtime(0, 0, 1, "cpu", torch.float32, nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
    result = train.evaluate(model, batches, cfg, rt)
    rows = batches.draw("val", np.random.default_rng([cfg["seed"], 1]), 3 * batches.B)
    with torch.no_grad():
        loss, correct, count = reply_loss(model, data, "val", rows)
    assert result["val_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert result["val_acc"] == pytest.approx(correct / count)


# --- conversations longer than a row --------------------------------------------------------------

def test_a_conversation_longer_than_block_size_keeps_its_beginning(base_data, tmp_path, capsys):
    """A conversation of more than block_size + 1 tokens is counted in one notice and gives a row
    of its first block_size + 1 tokens; none that reaches a reply at all is an error."""
    long = {"messages": [{"role": "user", "content": "tell me a long story"},
                         {"role": "assistant", "content": "Once upon a time. " * 4}]}
    records = [long] + [{"prompt": "hi", "completion": "hello"}] * 9
    data = prepare_chat(write_jsonl(tmp_path / "c.jsonl", records), base_data, tmp_path / "data", "--val_fraction",
                        "0.1", "--seed", "3")
    capsys.readouterr()
    T = 40
    split = next(s for s in ("train", "val") if np.diff(read_split(data, s)[2]).max() > T + 1)
    tokens, mask, starts = read_split(data, split)
    i = int(np.argmax(np.diff(starts)))
    assert starts[i + 1] - starts[i] > T + 1
    _, batches = chat_batches(data, block_size=T)
    assert capsys.readouterr().out.count("notice:") == 1
    x, y = batches.get(split, np.array([i]))
    window = tokens[starts[i]:starts[i] + T + 1].astype(np.int64)
    assert x[0].tolist() == window[:-1].tolist()
    assert y[0].tolist() == np.where(mask[starts[i] + 1:starts[i] + T + 1] == 1, window[1:], -1).tolist()
    with pytest.raises(UserError, match="reaches a reply within block_size"):
        chat_batches(data, block_size=3)


@pytest.mark.slow
def test_training_on_long_conversations_says_so_once_and_runs(base_data, tmp_path):
    records = [{"prompt": "tell me a long story", "completion": "Once upon a time. " * (1 + i % 4)} for i in range(20)]
    data = prepare_chat(write_jsonl(tmp_path / "c.jsonl", records), base_data, tmp_path / "data")
    result = train_run(data, tmp_path / "out", "--max_iters=3", "--eval_interval=3", "--block_size=32")
    assert result.stdout.count("notice: conversations longer than block_size + 1 = 33 tokens") == 1


# --- training: the vocabulary grows, resume is exact, 2 ranks == 1 ----------------------------------

@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A base model's checkpoint: BASE's vocabulary, no chat markers."""
    return save(tiny_model(BASE.vocab_size), BASE, tmp_path_factory.mktemp("base") / "ckpt.pt")


def test_a_base_model_grows_the_chat_markers_as_mean_rows(chat_data, base_ckpt, tmp_path):
    """init_from a base checkpoint on chat data: the embedding (and the tied head) gains the four
    markers' rows, each the mean of the old rows; the old rows are unchanged."""
    data, _ = chat_data
    cfg = train.load_config([f"--dataset={data}", f"--init_from={base_ckpt}", "--block_size=64", "--device=cpu"])
    model, _ = train.build_model(cfg, CHAT.vocab_size, CHAT, "cpu")
    old = gpt.load_checkpoint(base_ckpt)["model"]["transformer.wte.weight"]
    wte = model.transformer.wte.weight
    V = BASE.vocab_size
    assert wte.shape == (V + 4, old.size(1)) and model.config.vocab_size == V + 4
    assert torch.equal(wte[:V], old) and torch.allclose(wte[V:], old.mean(0).expand(4, -1))
    assert model.lm_head.weight is wte


def test_only_the_chat_markers_may_be_new_to_a_model(chat_data, base_ckpt):
    """check_compatible accepts the model's own tokenizer plus the markers, and a model with rows
    to spare; another character set, or a vocabulary that is not the model's, stays an error."""
    data, _ = chat_data
    cfg = train.load_config([f"--dataset={data}", "--block_size=64"])
    ckpt, V = gpt.load_checkpoint(base_ckpt), CHAT.vocab_size
    train.check_compatible(cfg, ckpt, V, CHAT, base_ckpt, resume=False)
    padded = ckpt | {"model_args": ckpt["model_args"] | {"vocab_size": 128}}
    train.check_compatible(cfg, padded, V, CHAT, base_ckpt, resume=False)
    other = Tokenizer("char", chars="".join(sorted(set(CHARS) - {"!"} | {"~"}))).with_chat_specials()
    with pytest.raises(UserError, match="a different character set"):
        train.check_compatible(cfg, ckpt, other.vocab_size, other, base_ckpt, resume=False)
    tuned = ckpt | {"tokenizer": CHAT.to_dict(), "model_args": ckpt["model_args"] | {"vocab_size": V}}
    with pytest.raises(UserError, match="the chat markers, which dataset"):
        train.check_compatible(cfg, tuned, BASE.vocab_size, BASE, base_ckpt, resume=False)
    small = ckpt | {"model_args": ckpt["model_args"] | {"vocab_size": 40}}
    with pytest.raises(UserError, match="vocab_size=40"):
        train.check_compatible(cfg, small, V, CHAT, base_ckpt, resume=False)


def test_init_from_a_checkpoint_with_a_larger_block_size_is_one_line(base_data, base_ckpt, tmp_path):
    """A checkpoint's position embeddings end at its block_size: --block_size may lower it, and one
    above it is one error line naming both, before anything is written."""
    result = run_in_process(train.main, f"--dataset={base_data}", f"--init_from={base_ckpt}", "--block_size=96",
                            "--device=cpu", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "block_size=96", f"{base_ckpt}'s block_size=80")
    assert result.stdout == "" and not (tmp_path / "out").exists()


CHAT_RUN = ["--block_size=72", "--eval_interval=4", "--log_interval=1", "--weight_decay=0.0"]


@pytest.mark.slow
def test_a_chat_run_resumes_exactly(chat_data, base_ckpt, tmp_path):
    """Fine-tuning on conversations, stopped and resumed, gives the losses of the run never
    stopped: the conversation draws continue from the saved batch generator."""
    data, _ = chat_data
    start = [f"--init_from={base_ckpt}", *CHAT_RUN, "--dropout=0.1"]
    train_run(data, tmp_path / "straight", *start, "--max_iters=10")
    train_run(data, tmp_path / "run", *start, "--max_iters=5")
    result = run_in_process(train.main, "--init_from=resume", f"--out_dir={tmp_path / 'run'}", "--max_iters=10")
    assert result.returncode == 0, result.stderr[-2000:]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 11))
    for it in range(6, 11):
        assert resumed[it] == pytest.approx(straight[it], abs=1e-6), it
    assert gpt.load_checkpoint(tmp_path / "run" / "ckpt.pt")["tokenizer"] == CHAT.to_dict()


@pytest.mark.slow
def test_two_ranks_on_a_chat_dataset_match_one(chat_data, base_ckpt, tmp_path):
    """2 gloo ranks x 1 micro-step == 1 rank x 2 on conversations: each step's draw is shared and
    each rank takes its share, and each micro-batch's loss is its own reply tokens' mean."""
    data, _ = chat_data
    settings = [f"--init_from={base_ckpt}", *CHAT_RUN, "--max_iters=6", "--gradient_accumulation_steps=2"]
    train_run(data, tmp_path / "single", *settings)
    result = subprocess.run(torchrun(data, tmp_path / "ddp", *settings), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(two) == list(range(1, 7))
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=1e-5), it
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val(tmp_path / "ddp") == pytest.approx(val(tmp_path / "single"), abs=1e-5)


# --- sample.py --chat -----------------------------------------------------------------------------

def chat_in_process(monkeypatch, capsys, ckpt, lines, *flags):
    """sample.py --chat inside this process: (exit status, stdout, stderr)."""
    result = main_in_process(monkeypatch, capsys, sample.main, ["--ckpt", ckpt, "--device=cpu", "--dtype=float32",
                                                                "--chat", *flags], "".join(line + "\n" for line in lines))
    return result.returncode, result.stdout, result.stderr


def scripted_replies(monkeypatch, replies):
    """generate_stream replaced by one that records each prompt and yields the next reply's tokens."""
    prompts = []

    def fake_generate_stream(model, idx, max_new_tokens, **kwargs):
        prompts.append(idx[0].tolist())
        for token in replies[len(prompts) - 1][:max_new_tokens]:
            yield torch.tensor([token])

    monkeypatch.setattr(sample, "generate_stream", fake_generate_stream)
    return prompts


def test_chat_with_a_chat_model_renders_the_conversation_and_ends_at_end(monkeypatch, capsys, tmp_path):
    """Each line is a user message; the prompt is render_chat of the system prompt and the turns so
    far with the assistant turn opened; a reply ends at <|end|> (not shown); /reset keeps the
    system prompt, /system changes it."""
    ckpt = save(tiny_model(), CHAT, tmp_path / "chat.pt")
    end = CHAT.specials[END]
    prompts = scripted_replies(monkeypatch, [CHAT.encode("Hi.") + [end] + CHAT.encode("junk"),
                                             CHAT.encode("Yes.") + [end], CHAT.encode("No.") + [end]])
    status, out, err = chat_in_process(monkeypatch, capsys, ckpt, ["hello", "more?", "/reset", "/system Be nice.",
                                                                     "again"], "--system", "Be brief.")
    assert status == 0, err
    assert out.splitlines() == ["Hi.", "Yes.", "context cleared (the system prompt stays)",
                                "system prompt: Be nice.", "No."]
    system, nice = {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be nice."}
    turns = [system, {"role": "user", "content": "hello"}]
    assert prompts[0] == render_chat(CHAT, turns, add_generation_prompt=True)[0]
    turns += [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "more?"}]
    assert prompts[1] == render_chat(CHAT, turns, add_generation_prompt=True)[0]
    assert prompts[2] == render_chat(CHAT, [nice, {"role": "user", "content": "again"}], add_generation_prompt=True)[0]


def test_chat_with_a_base_model_continues_the_text_and_refuses_a_system_prompt(monkeypatch, capsys, tmp_path):
    """A base model keeps the plain continuation chat: lines joined by newlines, no markers."""
    ckpt = save(tiny_model(BASE.vocab_size), BASE, tmp_path / "base.pt")
    prompts = scripted_replies(monkeypatch, [BASE.encode(" there"), BASE.encode("!")])
    status, out, err = chat_in_process(monkeypatch, capsys, ckpt, ["hello", "/system Be brief.", "you"],
                                       "--max_new_tokens=6")
    assert status == 0, err
    assert prompts == [BASE.encode("hello"), BASE.encode("hello there\nyou")]
    assert "error: /system needs a chat-tuned model" in err
    status, _, err = chat_in_process(monkeypatch, capsys, ckpt, [], "--system", "Be brief.")
    assert status == 1 and err.strip().splitlines() == [
        "error: --system needs a chat-tuned model (prepare.py --format chat, then train.py); this model's "
        "tokenizer has no chat markers"]


# --- learning: a rule that held-out questions follow ------------------------------------------------

VOWELS, SYSTEM = "aeiou", "NAME THE VOWEL."  # no lowercase vowel in it: the reply is one from the word


def vowel_word(rng):
    """Four letters, one of them a vowel: a question of the synthetic task (README's example)."""
    letters = [rng.choice([c for c in LETTERS if c not in VOWELS]) for _ in range(4)]
    letters[rng.randrange(4)] = rng.choice(VOWELS)
    return "".join(letters)


def vowel_chat(question, reply=True):
    """The conversation: the system prompt, the word, and (if reply) its vowel as the answer."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + [{"role": "assistant", "content": next(c for c in question if c in VOWELS)}] * reply


def answers(model, tok, questions):
    """Greedy replies to each question, all at once (the prompts are the same length): up to
    <|end|> for a chat model, to the end of the line for a base model in the plain template."""
    prompts = torch.tensor([render_chat(tok, vowel_chat(q, reply=False), add_generation_prompt=True)[0]
                            for q in questions])
    if tok.is_chat:
        return [tok.decode(new) for new in generate(model, prompts, 4, temperature=0, stop_tokens=(tok.specials[END],))]
    return [tok.decode(new).split("\n")[0].strip() for new in generate(model, prompts, 4, temperature=0)]


def one_thread_train(*argv):
    """train.py's command line in this process, on one thread: a model this small only loses time
    to a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_in_process(train.main, *argv)
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def accuracy(ckpt, questions):
    checkpoint = gpt.load_checkpoint(ckpt)
    model = gpt.model_from_checkpoint(checkpoint).eval()
    replies = answers(model, load_tokenizer(checkpoint["tokenizer"]), questions)
    return sum(reply == vowel_chat(q)[-1]["content"] for reply, q in zip(replies, questions)) / len(questions)


@pytest.mark.slow
def test_fine_tuning_teaches_a_rule_that_held_out_questions_follow(tmp_path, monkeypatch, capsys):
    """A char model pretrained for seconds on random words, then fine-tuned with config/chat.py on
    "Name the vowel." conversations: on held-out words (never in training) the greedy reply is the
    word's vowel at least 90% of the time after, at most 10% before (the base model in the plain
    template); sample.py --chat --system gives generate's replies."""
    rng = random.Random(0)
    lines = [" ".join(word(rng, rng.randint(1, 7)) for _ in range(rng.randint(2, 8))).capitalize()
             + rng.choice(["", ".", ":", "?"]) for _ in range(3000)]
    corpus = tmp_path / "words.txt"
    corpus.write_text(CHARS + "\n" + "\n".join(lines) + "\n")
    held_out = sorted({vowel_word(rng) for _ in range(100)})
    train_words = [w for w in (vowel_word(rng) for _ in range(2200)) if w not in held_out][:2000]
    chats = write_jsonl(tmp_path / "vowels.jsonl", [{"messages": vowel_chat(w)} for w in train_words])

    prepare.main(["--input", str(corpus), "--out", str(tmp_path / "words")])
    pretrain = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--batch_size=16", "--eval_iters=4",
                "--device=cpu", "--dtype=float32", "--learning_rate=3e-3", "--warmup_iters=10", "--min_lr=3e-4",
                "--max_iters=200", "--lr_decay_iters=200", "--eval_interval=200", "--log_interval=50"]
    one_thread_train(*pretrain, f"--dataset={tmp_path / 'words'}", f"--out_dir={tmp_path / 'base'}")
    base = tmp_path / "base" / "ckpt.pt"
    prepare_chat(chats, base, tmp_path / "vowels")
    result = one_thread_train(ROOT / "config" / "chat.py", f"--dataset={tmp_path / 'vowels'}", f"--init_from={base}",
                              f"--out_dir={tmp_path / 'chat'}", "--device=cpu", "--dtype=float32",
                              "--eval_interval=600")  # config/chat.py's steps, evaluated at 0 and 600
    assert f"vocabulary: {BASE.vocab_size} -> {CHAT.vocab_size} tokens" in result.stdout

    tuned = tmp_path / "chat" / "ckpt.pt"
    before, after = accuracy(base, held_out), accuracy(tuned, held_out)
    with capsys.disabled():  # printed past the capture: BENCHMARKS.md quotes it
        print(f"\nheld-out accuracy on {len(held_out)} words: {before:.0%} before, {after:.0%} after")
    assert before <= 0.1 and after >= 0.9, (before, after)

    questions = held_out[:3]
    status, out, err = chat_in_process(monkeypatch, capsys, tuned, [x for q in questions for x in (q, "/reset")],
                                       "--temperature=0", "--system", SYSTEM)
    assert status == 0, err
    checkpoint = gpt.load_checkpoint(tuned)
    model = gpt.model_from_checkpoint(checkpoint).eval()
    assert out.splitlines()[::2] == answers(model, load_tokenizer(checkpoint["tokenizer"]), questions)
