"""What a user does with a trained model: cell embeddings (`embed`)."""
from .embed import Embeddings, embed, embedding_dataset, gather_embeddings, load_model

__all__ = ["Embeddings", "embed", "embedding_dataset", "gather_embeddings", "load_model"]
