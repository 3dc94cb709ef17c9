"""The reader side: prompts with retrieved context, closed-answer scoring from logits, generation, RAG-SFT."""
