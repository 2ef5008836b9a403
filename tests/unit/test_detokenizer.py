"""The incremental detokenizer on the bundled models' real tokenizers: streamed text equals the whole output decoded
at once, and the Rust tokenizer's own decode (its fast path) gives what transformers' decode gives."""
import random

import pytest
from transformers import AutoTokenizer

from ember.engine.detokenizer import IncrementalDetokenizer, _rust_decode


@pytest.mark.parametrize("model", ["qwen_dir", "smollm2_dir", "gemma3_dir"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_streamed_text_equals_the_whole_decode_on_the_fast_path(model, skip_special, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    rng = random.Random(0)
    special = sorted(tok.all_special_ids)
    text = "Grüße, 世界! naïve café — 🙂 x<y && y>z\n\tdef f(a):  return a**2  # ok"
    ids = tok.encode(text, add_special_tokens=False)
    for trial in range(20):  # the text's ids, random ids (broken UTF-8 mid-character), special tokens
        out = [rng.randrange(len(tok)) if rng.random() < 0.4 else rng.choice(ids) for _ in range(40)]
        out[rng.randrange(40)] = rng.choice(special)
        prompt = ids[:5]
        fast = IncrementalDetokenizer(tok, prompt, [], skip_special)
        slow = IncrementalDetokenizer(tok, prompt, [], skip_special)
        slow.rust_decode = None  # transformers' decode
        assert fast.rust_decode is not None
        streams = []
        for d in (fast, slow):
            pieces = []
            for t in out:
                d.add(t)
                pieces.append(d.take_delta(final=False))
            d.flush()
            pieces.append(d.take_delta(final=True))
            streams.append(pieces)
        assert streams[0] == streams[1]
        # the stream adds up to the whole output decoded with its left context (as the detokenizer starts)
        whole = tok.decode(prompt[-4:] + out, skip_special_tokens=skip_special)
        assert whole.endswith("".join(streams[0]))


def test_no_fast_path_where_transformers_would_clean_up_spaces(qwen_dir):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert _rust_decode(tok) is not None
    tok.clean_up_tokenization_spaces = True
    assert _rust_decode(tok) is None
