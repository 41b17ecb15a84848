"""Prompt Guard 2 through transformers' DeBERTa-v2: long text is scored over non-overlapping 512-token windows and an
injection in the 3rd window is caught. The tiny classifier is built so that one token, INJECT, drives label 1."""
import pytest
import torch

from herd.guard.prompt_guard import WINDOW, PromptGuard, load_prompt_guard
from herd.guard.verdict import GuardError

transformers = pytest.importorskip("transformers")
H = 32
WORDS = [f"w{i}" for i in range(50)]


def tiny_prompt_guard(folder):
    """A 1-layer DeBERTa-v2 classifier with hand-set weights: every token's embedding has mean 0 and no component
    on axis 0, except INJECT's (so layer norms keep axis 0 exactly 0 for ordinary tokens); attention is uniform
    (zero q/k) and its values keep only axis 0, amplified, so [CLS] sees INJECT anywhere in its window; the FFN adds
    nothing; pooler and classifier turn axis 0 into label 1's logit."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "INJECT"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]",
                                               pad_token="[PAD]", unk_token="[UNK]", model_max_length=WINDOW)
    cfg = transformers.DebertaV2Config(vocab_size=len(vocab), hidden_size=H, num_hidden_layers=1, num_attention_heads=1,
                                       intermediate_size=64, max_position_embeddings=WINDOW, relative_attention=False,
                                       position_biased_input=True, type_vocab_size=0, num_labels=2,
                                       id2label={0: "BENIGN", 1: "MALICIOUS"}, label2id={"BENIGN": 0, "MALICIOUS": 1},
                                       pooler_hidden_size=H, pooler_hidden_act="gelu")
    model = transformers.DebertaV2ForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.fill_(1.0)
        emb = torch.randn(len(vocab), H, generator=g)
        emb[:, 0] = 0
        emb[:, 1:] -= emb[:, 1:].mean(-1, keepdim=True)              # mean 0 over the row, axis 0 exactly 0
        emb[vocab["INJECT"]] = 0
        emb[vocab["INJECT"], 0], emb[vocab["INJECT"], 1] = 5.0, -5.0
        model.deberta.embeddings.word_embeddings.weight.copy_(emb)
        att = model.deberta.encoder.layer[0].attention
        att.self.value_proj.weight[0, 0] = 2000.0                     # only axis 0 travels, amplified
        att.output.dense.weight.copy_(torch.eye(H))
        model.pooler.dense.weight.copy_(torch.eye(H))
        model.classifier.weight[1, 0], model.classifier.bias[1] = 3.0, -2.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return load_prompt_guard(tiny_prompt_guard(tmp_path_factory.mktemp("pg")))


def words(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist()]


def test_windows_are_non_overlapping_512(guard):
    text = " ".join(words(1300, 1))
    wins = guard.windows(text)
    assert [len(w) for w in wins] == [512, 512, 1300 - 2 * 510 + 2]
    assert all(w[0] == 1 and w[-1] == 2 for w in wins)
    assert sum((w[1:-1] for w in wins), []) == guard.tok(text, add_special_tokens=False)["input_ids"]


def test_injection_in_third_window_is_caught(guard):
    body = words(1300, 2)
    clean = guard.window_scores(" ".join(body))
    assert max(clean) < 0.2
    body[2 * 510 + 137] = "INJECT"                  # inside the 3rd window only
    text = " ".join(body)
    scores = guard.window_scores(text)
    assert scores[0] < 0.2 and scores[1] < 0.2 and scores[2] > 0.9
    v = guard.check(text)
    assert v.flagged and v.score == max(scores) and v.tokens == 512 + 512 + 282
    # the classifier alone on the first 512 tokens (what truncation would give) misses it
    first = guard.tok(text, truncation=True, max_length=WINDOW, return_tensors="pt")
    with torch.no_grad():
        p = guard.model(**first).logits.softmax(-1)[0, 1]
    assert p < 0.2


def test_short_and_bad_input(guard):
    assert guard.check("w1 INJECT w2").flagged and not guard.check("w1 w2 w3").flagged
    for bad, match in (("", "empty"), ("  \n", "empty"), ("x" * (1 << 20), "at most")):
        with pytest.raises(GuardError, match=match):
            guard.check(bad)


def test_load_refuses_pickles_and_missing(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(GuardError, match="never unpickles"):
        load_prompt_guard(tmp_path)
