"""The tiny models' preparation: what the tokenizer is trained on."""

from __future__ import annotations

from medrag_ray.config import SyntheticDataConfig
from medrag_ray.data.synthetic import generate
from medrag_ray.models.prepare import tokenizer_texts
from medrag_ray.models.tokenizer import train_bpe_tokenizer
from medrag_ray.reader.prompts import closed_rag_prompt, report_prompt


def test_prompt_wording_becomes_whole_tokens() -> None:
    """Trained with the prompts' wording, the tokenizer spends about one token per word of the scaffolding (the
    RULE prompt around three reports) instead of splitting its words into letters."""
    data = generate(SyntheticDataConfig(n_per_domain=30, n_phenotypes=2, image_size=32, seed=3))
    samples = data.samples["train"]
    tokenizer = train_bpe_tokenizer(tokenizer_texts(samples, data.corpus), 2048)
    closed = next(s for s in samples if s.answer_type == "closed")
    for prompt in (closed_rag_prompt(closed.question, ["", "", ""], closed.domain), report_prompt(["", ""])):
        words = prompt.split()
        assert len(tokenizer.tokenize(prompt)) <= 1.6 * len(words), tokenizer.tokenize(prompt)
    without = train_bpe_tokenizer([d.text for d in data.corpus] + [s.question for s in samples if s.question], 2048)
    prompt = closed_rag_prompt(closed.question, ["", "", ""], closed.domain)
    assert len(without.tokenize(prompt)) > 2 * len(tokenizer.tokenize(prompt)), "the check above must be able to fail"
