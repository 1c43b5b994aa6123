"""The pure text pieces of serving, by hand: think split, stop strings, stream deltas, request checks."""
from __future__ import annotations

import pytest

from thinkscale.serve.protocol import ApiError, Settings, chat_messages, completion_prompts, parse_generation
from thinkscale.reflect.answer import cut_at_stop
from thinkscale.serve.text import DeltaStream, opens_think, split_reasoning

TAGS = ("<think>", "</think>")


def test_split_reasoning():
    assert split_reasoning("a.\n\nb.\n</think>\n\\boxed{3}", TAGS, True) == ("a.\n\nb.", "\\boxed{3}")
    assert split_reasoning("<think>x</think> y", TAGS, False) == ("x", "y")
    assert split_reasoning("no tags here", TAGS, False) == (None, "no tags here")
    assert split_reasoning("cut off while thinking", TAGS, True) == ("cut off while thinking", "")
    assert split_reasoning("x</think>y", None, True) == (None, "x</think>y")
    assert opens_think("Q?\n<think>\n", TAGS) and not opens_think("<think>a</think>\nQ?", TAGS)
    assert not opens_think("Q?", None)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abcSTOPdefEND", ("END", "STOP")) == ("abc", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_stream_deltas_hold_back_partial_tags_stop_strings_and_characters():
    stream = DeltaStream(TAGS, in_think=True, stop=("##",))
    assert stream.feed("step one.</th") == ("step one.", "")  # "</th" may be the end tag
    assert stream.feed("step one.</think>\nans") == ("", "ans")
    assert stream.feed("step one.</think>\nanswer #") == ("", "wer ")  # "#" may start the stop string
    assert stream.feed("step one.</think>\nanswer 7\ufffd") == ("", "7")  # an unfinished character waits
    assert stream.feed("step one.</think>\nanswer 7é## more") == ("", "é")  # cut at the stop string
    assert stream.feed("step one.</think>\nanswer 7é## more", final=True) == ("", "")
    plain = DeltaStream(None, in_think=False)
    assert plain.feed("a<thi") == ("", "a<thi") and plain.feed("a<think>b", final=True) == ("", "nk>b")


def test_request_checks_by_hand():
    settings = Settings("m", max_candidates=16, context=100, max_tokens=50)
    gen = parse_generation({"reasoning_effort": "medium", "n": 2, "temperature": 0, "seed": 0}, "chat", settings,
                           [[1] * 60], ["p"])
    assert (gen.k, gen.n, gen.rows, gen.temperature, gen.seed, gen.max_tokens) == (8, 2, 16, 0.0, 0, 40)
    with pytest.raises(ApiError, match="32 candidates, over this server's limit of 16") as error:
        parse_generation({"reasoning_effort": "high"}, "chat", settings, [[1]], ["p"])
    assert error.value.status == 400 and error.value.param == "n"
    with pytest.raises(ApiError, match="unknown value 'max'"):
        parse_generation({"reasoning_effort": "max"}, "chat", settings, [[1]], ["p"])
    with pytest.raises(ApiError, match="give one"):
        parse_generation({"max_tokens": 3, "max_completion_tokens": 4}, "chat", settings, [[1]], ["p"])
    assert parse_generation({"max_tokens": 3, "max_completion_tokens": 3}, "chat", settings, [[1]], ["p"]).max_tokens == 3
    with pytest.raises(ApiError) as error:
        parse_generation({}, "chat", settings, [[1] * 100], ["p"])
    assert error.value.body()["error"]["code"] == "context_length_exceeded"
    assert chat_messages({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}]}) == \
        [{"role": "user", "content": "ab"}]
    assert completion_prompts({"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]
    assert completion_prompts({"prompt": "x\ud800"}) == ["x\ufffd"]


def test_token_bytes_keep_the_pieces_of_a_character():
    from thinkscale.reflect.loading import check_model_arg, load_tokenizer
    from thinkscale.serve.text import token_bytes

    tokenizer = load_tokenizer(check_model_arg("smollm2"))  # byte-level BPE that splits 日 over two tokens
    text = "café — naïve 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = token_bytes(tokenizer, ids)
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(not p.decode("utf-8", errors="ignore") for p in pieces)  # a piece that is no character alone
