"""A request's stop conditions, text and finish reason: the one path both engines take each token through,
and the serving interface both engines satisfy."""

from __future__ import annotations

import torch

from hetserve.runtime import SamplingParams
from hetserve.runtime.model.tiny import tiny_tokenizer
from hetserve.runtime.request import RequestState, accept_tokens

TOK = tiny_tokenizer()
EOS = {2}


def request(text_prompt: str = "hi", **params) -> RequestState:
    return RequestState.create(
        0,
        text_prompt,
        SamplingParams(**params),
        tokenizer=TOK,
        vocab_size=TOK.vocab_size,
        max_model_len=64,
        generator=torch.Generator(),
    )


def feed(req: RequestState, text: str) -> list[str]:
    """Token by token, as an engine does, until the request is done."""
    deltas = []
    for t in TOK.encode(text):
        deltas.append(req.accept(t, EOS))
        if req.done:
            break
    return deltas


def test_a_stop_string_ends_the_request_and_is_cut_from_the_text():
    req = request(stop=["END"], max_tokens=50)
    deltas = feed(req, "hello wEND more")
    assert req.finish_reason == "stop" and req.done
    assert req.text == "hello w"
    assert "".join(deltas) + req.finish() == "hello w"  # no part of the stop string was ever sent
    assert req.output(0, "").finish_reason == "stop"


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot():
    req = request(stop=["END"], max_tokens=50)
    streamed = "".join(feed(req, "abc EN"))
    assert streamed == "abc " and req.text == "abc EN"  # "EN" could still become "END"
    streamed += "".join(feed(req, "Xyz"))
    assert "EN" in streamed and not req.done
    streamed += req.finish()  # ended by length: everything is released
    assert streamed == req.text == "abc ENXyz" and req.finish_reason == "length"


def test_end_of_sequence_stops_unless_ignored_and_stop_tokens_always_stop():
    req = request(max_tokens=10)
    req.accept(5, EOS)
    assert not req.done
    req.accept(2, EOS)
    assert req.finish_reason == "stop" and req.output_token_ids == [5, 2]
    ignoring = request(max_tokens=10, ignore_eos=True, stop_token_ids=[7])
    ignoring.accept(2, EOS)
    assert ignoring.finish_reason is None
    ignoring.accept(7, EOS)
    assert ignoring.finish_reason == "stop"


def test_max_tokens_ends_by_length_and_releases_the_held_back_text():
    req = request(max_tokens=3)
    ids = TOK.encode("é")  # one character over several byte tokens: the decoder holds it back
    assert len(ids) >= 2
    out = [req.accept(t, EOS) for t in [*TOK.encode("a"), ids[0]]]
    assert not req.done
    out.append(req.accept(ids[1], EOS))
    if len(ids) > 2:
        assert req.done and req.finish_reason is None
        tail = req.finish()
        assert req.finish_reason == "length" and "é" not in "".join(out) + tail
    else:
        assert req.done
        req.finish()
        assert req.finish_reason == "length" and req.text.endswith("é")
    last = req.output(ids[1], "")
    assert last.finished and last.finish_reason == "length" and len(last.token_ids) == 3


def test_max_tokens_is_capped_to_the_context_and_a_seed_gives_its_own_stream():
    req = request("x" * 10, max_tokens=500, seed=3)
    assert req.params.max_tokens == 64 - len(req.prompt_token_ids)
    again = request("x" * 10, max_tokens=500, seed=3)
    assert (
        torch.rand(3, generator=req.generator).tolist() == torch.rand(3, generator=again.generator).tolist()
    )


def test_accept_tokens_reports_the_sequences_that_stop():
    from hetserve.scheduling import Sequence

    a, b = request(max_tokens=5), request(max_tokens=5)
    a.seq, b.seq = Sequence(10, 1, 5), Sequence(11, 1, 5)
    deltas, stopped = accept_tokens([a, b], [2, 5], EOS)
    assert stopped == {10} and len(deltas) == 2
