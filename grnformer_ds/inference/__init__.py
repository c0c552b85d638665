"""What a user does with a trained model: cell embeddings (`embed`), the TF-attention report (`tf_attention`)."""
from .embed import Embeddings, embed, embedding_dataset, gather_embeddings, load_model

__all__ = ["Embeddings", "embed", "embedding_dataset", "gather_embeddings", "load_model"]
