"""`ragrt finetune`: contrastive retriever training and answer-only generator training (SFT, RAG marginal)."""
