# Templates, the <image> move, tokenization around the image and SPEC 5.2 label masks.
from __future__ import annotations

import pytest
from datahelpers import CONVERSATIONS

from olavlm.data.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    ConversationError,
    num_tokens_before_image,
    prepare_turns,
    render,
    tokenize_conversation,
)

LLAMA = TEMPLATES["llava_llama_3"]
PHI = TEMPLATES["llava_phi_3"]


def _encode_image_prompt(tokenizer, prompt: str) -> list[int]:
    """The seed's tokenizer_image_token: pieces around <image>, BOS of later pieces dropped."""
    pieces = [tokenizer(p).input_ids for p in prompt.split("<image>")]
    offset = int(bool(pieces[0]) and pieces[0][0] == tokenizer.bos_token_id)
    out = list(pieces[0])
    for piece in pieces[1:]:
        out += [IMAGE_TOKEN_INDEX] + piece[offset:]
    return out


def _seed_labels(tokenizer, prompt: str, conv=LLAMA, later_rounds_shift: int = 0) -> list[int]:
    """SPEC 5.2's arithmetic, written from the spec, as the oracle: llava_llama_3's by default;
    llava_phi_3's (``conv=PHI``) has round_len and instruction_len 2 smaller
    (``later_rounds_shift=2``) for rounds after the first."""
    ids = _encode_image_prompt(tokenizer, prompt)
    target = list(ids)
    sep = conv.sep + conv.roles[1]
    rounds = prompt.split(conv.sep)
    re_rounds = [conv.sep.join(rounds[:3])]
    re_rounds += [conv.sep.join(rounds[i:i + 2]) for i in range(3, len(rounds), 2)]
    cur = 1  # BOS at position 0
    target[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(re_rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(_encode_image_prompt(tokenizer, rou))  # its BOS stands in for <eot>
        instruction_len = len(_encode_image_prompt(tokenizer, parts[0])) - 2
        if i > 0:
            round_len, instruction_len = (round_len - later_rounds_shift,
                                          instruction_len - later_rounds_shift)
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "the oracle itself found a length mismatch"
    return target


def _supervised_runs(tokenizer, ids, labels) -> list[str]:
    """The decoded text of each maximal run of supervised positions."""
    runs, current = [], []
    for tok, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_llama3_prompt_is_system_sep_then_role_msg_sep():
    turns = prepare_turns(CONVERSATIONS[0], has_image=True)
    expected = (
        LLAMA.system + "<|eot_id|>"
        + "<|start_header_id|>user<|end_header_id|>\n\n"
        + "<image>\nWhat colour is the circle?<|eot_id|>"
        + "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        + "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
        + "<|start_header_id|>assistant<|end_header_id|>\n\nThe square is blue.<|eot_id|>"
    )
    assert render("llava_llama_3", turns).text == expected
    assert LLAMA.system.startswith("<|start_header_id|>system<|end_header_id|>\n\nA chat between")


def test_phi3_and_plain_prompts():
    turns = prepare_turns(CONVERSATIONS[0], has_image=True)
    assert render("llava_phi_3", turns).text == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>"
        "\n<|user|>\n<image>\nWhat colour is the circle?<|end|>\n<|assistant|>\nred<|end|>"
        "\n<|user|>\nAnd the square?<|end|>\n<|assistant|>\nThe square is blue.<|end|>")
    two = prepare_turns(CONVERSATIONS[1], has_image=True)
    assert render("plain", two).text == (
        "<image>A small green triangle left of a large yellow circle.\n")
    with pytest.raises(ConversationError, match="exactly one human and one gpt"):
        render("plain", turns)


def test_generation_prompt_appends_the_assistant_role():
    turns = prepare_turns([{"from": "human", "value": "Hi?"}], has_image=False)
    text = render("llava_llama_3", turns, add_generation_prompt=True).text
    assert text.endswith("Hi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_image_placeholder_moves_to_the_start_of_the_first_human_turn():
    conv = [{"from": "human", "value": "Look at this <image> please"},
            {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "again <image>"}, {"from": "gpt", "value": "fine"}]
    assert prepare_turns(conv, has_image=True) == [
        (0, "<image>\nLook at this  please"), (1, "ok"), (0, "again"), (1, "fine")]
    # The entry has an image but forgot the placeholder: it is inserted all the same.
    no_tag = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]
    assert prepare_turns(no_tag, has_image=True)[0] == (0, "<image>\nWhat?")
    # A placeholder without an image is dropped (text-only sample).
    assert prepare_turns(conv, has_image=False)[0] == (0, "Look at this  please")


def test_turn_order_rules():
    lead = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"}]
    assert prepare_turns(lead, has_image=False) == [(0, "q"), (1, "a")]  # seed drops it
    aliases = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]
    assert prepare_turns(aliases, has_image=False) == [(0, "q"), (1, "a")]
    with pytest.raises(ConversationError, match="alternate") as err:
        prepare_turns([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], False)
    assert err.value.reason == "bad_entry"
    with pytest.raises(ConversationError, match="'from' must be one of"):
        prepare_turns([{"from": "bot", "value": "q"}], False)
    with pytest.raises(ConversationError) as err:
        prepare_turns([], False)
    assert err.value.reason == "no_conversations"


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["2-turn-img", "caption", "3-turn-text"])
@pytest.mark.parametrize("has_image", [True, False])
def test_llama3_labels_equal_the_seed_arithmetic(llama_tokenizer, conv, has_image):
    out = tokenize_conversation(conv, llama_tokenizer, "llava_llama_3", has_image=has_image)
    prompt = render("llava_llama_3", prepare_turns(conv, has_image)).text
    assert out.input_ids.tolist() == _encode_image_prompt(llama_tokenizer, prompt)
    assert out.labels.tolist() == _seed_labels(llama_tokenizer, prompt)
    assert (IMAGE_TOKEN_INDEX in out.input_ids.tolist()) == has_image


def test_llama3_label_vector_multi_turn(llama_tokenizer):
    out = tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                                has_image=True)
    # Supervised: the header's last token "\n\n" (seed quirk), the answer, and <|eot_id|>.
    assert _supervised_runs(llama_tokenizer, out.input_ids, out.labels) == [
        "\n\nred<|eot_id|>", "\n\nThe square is blue.<|eot_id|>"]
    assert out.labels[0] == IGNORE_INDEX and out.input_ids[0] == llama_tokenizer.bos_token_id
    assert out.labels[out.image_position] == IGNORE_INDEX


def test_phi3_label_vector_multi_turn(phi_tokenizer):
    out = tokenize_conversation(CONVERSATIONS[2], phi_tokenizer, "llava_phi_3", has_image=True)
    runs = _supervised_runs(phi_tokenizer, out.input_ids, out.labels)
    assert [r.strip("\n") for r in runs] == ["four<|end|>", "three<|end|>", "the circle<|end|>"]
    assert all(r.startswith("\n") for r in runs)  # the "\n" closing "<|assistant|>\n"
    ids = out.input_ids.tolist()
    assert ids[0] == phi_tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 1


def test_plain_labels_are_the_caption_and_its_newline(llama_tokenizer):
    out = tokenize_conversation(CONVERSATIONS[1], llama_tokenizer, "plain", has_image=True)
    assert out.input_ids.tolist()[:2] == [llama_tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert out.labels.tolist()[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert (out.labels[2:] == out.input_ids[2:]).all()  # LLaVA's preprocess_plain
    assert llama_tokenizer.decode(out.input_ids[2:]) == (
        "A small green triangle left of a large yellow circle.\n")


def test_num_tokens_before_image_is_computed_from_template_and_tokenizer(llama_tokenizer,
                                                                         phi_tokenizer):
    prefix = LLAMA.system + LLAMA.sep + LLAMA.roles[0]
    n = num_tokens_before_image(llama_tokenizer, "llava_llama_3")
    assert n == len(llama_tokenizer(prefix).input_ids)  # BOS + system + sep + user role
    out = tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                                has_image=True)
    assert out.image_position == n
    phi_prefix = PHI.system + PHI.sep + PHI.roles[0]
    assert num_tokens_before_image(phi_tokenizer, "llava_phi_3") == len(
        phi_tokenizer(phi_prefix).input_ids)
    assert num_tokens_before_image(llama_tokenizer, "plain") == 1  # BOS only


def test_truncation_counts_the_spliced_image(llama_tokenizer):
    full = tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                                 has_image=True)
    n = len(full.input_ids)
    fits = tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                                 has_image=True, max_length=n - 1 + 10, num_image_tokens=10)
    assert not fits.truncated and fits.num_tokens == n
    cut = tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                                has_image=True, max_length=n - 1 + 10 - 5, num_image_tokens=10)
    assert cut.truncated and cut.num_tokens == n
    assert len(cut.input_ids) == n - 5 and len(cut.labels) == n - 5
    assert cut.input_ids.tolist() == full.input_ids.tolist()[: n - 5]
    with pytest.raises(ConversationError, match="no room for the image") as err:
        tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "llava_llama_3",
                              has_image=True, max_length=full.image_position + 5,
                              num_image_tokens=10)
    assert err.value.reason == "too_long"


def test_a_token_across_the_answer_start_is_the_labelled_header_end(tmp_path):
    # A SentencePiece-like tokenizer that may merge "\n" with the next word: the answer's
    # first token then also covers the header's "\n". It starts in the header, so it is the
    # header's last token, which is labelled (the seed's quirk) along with the answer.
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    pieces = ["\nYou are a helpful AI assistant.", "\nq", "\nblue", "\n"]
    tok.train_from_iterator(pieces * 50, trainers.BpeTrainer(vocab_size=120,
                                                             special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=special[3:])
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "blue"}]
    text = render("llava_phi_3", prepare_turns(conv, has_image=False)).text
    assert "\nblue" in fast.convert_ids_to_tokens(fast(text).input_ids)
    out = tokenize_conversation(conv, fast, "llava_phi_3", has_image=False)
    labelled = [t for t in out.labels.tolist() if t != IGNORE_INDEX]
    assert fast.convert_ids_to_tokens(labelled) == ["\nblue", "<|end|>"]


def test_phi3_chat_tokens_with_rstrip_keep_every_round(phi_tokenizer, tmp_path):
    """Phi-3's released tokenizer declares its chat tokens with rstrip=True: ``<|end|>`` then
    also covers the newline after it, past the answer's span. Every round must still train
    (a straddle used to reject each multi-turn sample)."""
    import json

    from transformers import AutoTokenizer

    phi_tokenizer.save_pretrained(str(tmp_path))
    chat = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", None)):
        data = json.loads((tmp_path / name).read_text())
        entries = data[key] if key else data.get("added_tokens_decoder", {}).values()
        for entry in entries:
            if entry["content"] in chat:
                entry["rstrip"] = True
        (tmp_path / name).write_text(json.dumps(data))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    end = tok("<|end|>\n<|user|>", return_offsets_mapping=True)
    assert end.offset_mapping[1] == (0, 8)  # <|end|> took the newline: the case under test
    out = tokenize_conversation(CONVERSATIONS[2], tok, "llava_phi_3", has_image=True)
    runs = [r.replace("<|assistant|>", "").strip() for r in
            _supervised_runs(tok, out.input_ids, out.labels)]
    assert runs == ["four<|end|>", "three<|end|>", "the circle<|end|>"]


def test_llama3_answer_opening_with_a_newline_equals_the_seed():
    """Llama-3's pre-tokenizer keeps "\n\n\n" in one piece (its vocabulary has the token):
    the header's "\n\n" and an answer's leading "\n" become one token across the boundary.
    The seed's round arithmetic trains on the sample, and so do we, with the same labels."""
    from datahelpers import corpus

    from olavlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus() + ["line one\n\n\nline two\n\n\nline three"] * 50,
                          vocab_size=700)
    assert len(tok("\n\n\n", add_special_tokens=False).input_ids) == 1
    conv = [{"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "\nThe square is blue."}]
    prompt = render("llava_llama_3", prepare_turns(conv, has_image=True)).text
    out = tokenize_conversation(conv, tok, "llava_llama_3", has_image=True)
    assert out.labels.tolist() == _seed_labels(tok, prompt)
    assert _supervised_runs(tok, out.input_ids, out.labels) == [
        "\n\n\nThe square is blue.<|eot_id|>"]


def test_tokenizer_and_template_arguments_are_checked(llama_tokenizer):
    with pytest.raises(ValueError, match="template must be one of"):
        tokenize_conversation(CONVERSATIONS[0], llama_tokenizer, "vicuna", has_image=False)
    with pytest.raises(TypeError, match="tokenizer must be a fast transformers tokenizer"):
        tokenize_conversation(CONVERSATIONS[0], object(), "plain", has_image=False)


@pytest.mark.parametrize("words", ["the cat sat ", "x" * 300 + " "])
def test_a_huge_answer_is_cut_before_tokenizing_with_the_same_tokens(llama_tokenizer,
                                                                     monkeypatch, words):
    """A prompt far longer than max_length tokens could need is cut to (max_length + 8) x
    MAX_CHARS_PER_TOKEN characters first (a 50 MB line took 21 GB to tokenize whole): the kept
    tokens and labels are those of the whole prompt, truncated (also for a 300-letter word,
    which spans several tokens)."""
    from olavlm.data import templates

    conv = [{"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": words * 2000}]
    opts = dict(has_image=True, max_length=48, num_image_tokens=4)
    cut = tokenize_conversation(conv, llama_tokenizer, "llava_llama_3", **opts)
    monkeypatch.setattr(templates, "MAX_CHARS_PER_TOKEN", 10**9)  # tokenize it whole
    whole = tokenize_conversation(conv, llama_tokenizer, "llava_llama_3", **opts)
    assert cut.truncated and whole.truncated
    assert cut.input_ids.tolist() == whole.input_ids.tolist()
    assert cut.labels.tolist() == whole.labels.tolist()
    assert cut.num_tokens < whole.num_tokens  # (counted on the cut prompt)


@pytest.mark.parametrize("template", ["llava_llama_3", "llava_phi_3"])
def test_labels_of_a_many_turn_conversation_are_the_per_span_rule_and_fast(
        llama_tokenizer, phi_tokenizer, template):
    """Labels of 400 short rounds equal the rule written plainly (a token whose start is in a
    supervised span, plus the last token covering each header's end), computed in linear
    time: the per-turn scan took seconds of a loader worker for such a conversation."""
    import time

    from olavlm.data.templates import _encode_pieces

    tokenizer = phi_tokenizer if template == "llava_phi_3" else llama_tokenizer
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    conv += [t for k in range(400) for t in ({"from": "human", "value": f"q{k}"},
                                             {"from": "gpt", "value": f"a {k}"})]
    out = tokenize_conversation(conv, tokenizer, template, has_image=True)
    rendered = render(template, prepare_turns(conv, True))
    ids, spans = _encode_pieces(tokenizer, rendered.text)
    want = [t if sp is not None and any(a <= sp[0] < e for a, e in rendered.supervised)
            else IGNORE_INDEX for t, sp in zip(ids, spans, strict=True)]
    for h in rendered.header_ends:
        last = max(i for i, sp in enumerate(spans) if sp and sp[0] <= h - 1 < sp[1])
        want[last] = ids[last]
    got = out.labels.tolist()
    assert got == want
    assert sum(label != IGNORE_INDEX for label in got) > 400
    many = conv[:2] + [t for k in range(2000) for t in ({"from": "human", "value": f"q{k}"},
                                                         {"from": "gpt", "value": f"a {k}"})]
    start = time.perf_counter()
    tokenize_conversation(many, tokenizer, template, has_image=True)
    assert time.perf_counter() - start < 3.0  # (6 s before, quadratic in the rounds)


@pytest.mark.parametrize("has_image", [True, False])
def test_a_placeholder_nested_in_another_leaves_no_second_image_token(llama_tokenizer,
                                                                      has_image):
    """Removing "<image>" once from "<im<image>age>" formed a new placeholder: two image tokens
    (the splice refuses the whole batch), or one in a text-only sample."""
    conv = [{"from": "human", "value": "<im<image>age> look"},
            {"from": "gpt", "value": "red <<image>image>"}]
    turns = prepare_turns(conv, has_image=has_image)
    assert turns == [(0, "<image>\nlook" if has_image else "look"), (1, "red")]
    out = tokenize_conversation(conv, llama_tokenizer, "llava_llama_3", has_image=has_image)
    assert out.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == int(has_image)
    assert _supervised_runs(llama_tokenizer, out.input_ids, out.labels) == ["\n\nred<|eot_id|>"]


def _phi3_like_tokenizer():
    """Phi-3's released tokenizer in miniature: SentencePiece-style normalizer (a "\u2581"
    prepended to every text piece, spaces as "\u2581"), "\\n" a token of its own (Phi-3's byte
    fallback <0x0A>), and its chat tokens declared with rstrip=True (they absorb the newline
    after them)."""
    import re

    from datahelpers import corpus
    from tokenizers import (
        AddedToken,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = [p for t in corpus() for p in re.split(r"<\|[a-z]+\|>|<image>", t) if p]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    alphabet = sorted(set("".join(texts)) | {"\u2581"})
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=alphabet))
    tok.add_special_tokens([AddedToken(t, rstrip=True, normalized=False, special=True)
                            for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("has_image", [True, False])
def test_phi3_labels_equal_the_seed_arithmetic_on_a_phi3_like_tokenizer(has_image):
    """The offsets-based mask against SPEC's Phi-3 round arithmetic, on a tokenizer that
    tokenizes a round differently alone than in context (a leading "\\n" costs "\u2581" + "\\n"
    alone and nothing after an rstrip <|end|>; an answer's leading "\\n" is absorbed by
    <|assistant|>)."""
    tok = _phi3_like_tokenizer()
    assert tok.convert_ids_to_tokens(tok("<|end|>\n<|user|>\nq").input_ids)[1:4] == [
        "<|end|>", "<|user|>", "\u2581"]
    convs = CONVERSATIONS + [[
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": " The square "},
        {"from": "human", "value": "And the circle?"},
        {"from": "gpt", "value": "\nred\n"}]]
    for conv in convs:
        out = tokenize_conversation(conv, tok, "llava_phi_3", has_image=has_image)
        prompt = render("llava_phi_3", prepare_turns(conv, has_image)).text
        assert out.labels.tolist() == _seed_labels(tok, prompt, PHI, later_rounds_shift=2)
        runs = _supervised_runs(tok, out.input_ids, out.labels)
        assert all(r.startswith("<|assistant|>") and r.endswith("<|end|>") for r in runs)
        assert len(runs) == len(conv) // 2
