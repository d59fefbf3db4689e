"""Context parallelism (``model.context_parallel_size``): each CP rank holds two of the sequence's 2 x CP equal
chunks, Megatron's load-balanced halves (rank r: chunk r and chunk 2CP-1-r), so causal attention costs every rank
the same. The batch is cut in the forward step (labels, loss mask, M-RoPE ids) and in the model (the embeddings,
after the images are inserted: an image's tokens may straddle a cut). Transformer Engine attends across ranks
itself; the local backend gathers the keys and values of the whole sequence (``attend_across_ranks``).

Megatron's ``get_batch_on_this_cp_rank`` cuts dimension 1 of every tensor; the M-RoPE ids [3, b, s] and the
embeddings [s, b, h] keep their sequence elsewhere, hence one index for all of them here.
"""

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region


def rank_positions(seq: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The sequence positions CP rank ``cp_rank`` holds, in its order."""
    if seq % (2 * cp_size):
        raise ValueError(f"a sequence of {seq} tokens does not cut into 2 x {cp_size} equal chunks for context "
                         "parallelism: make seq_length a multiple of 2 x model.context_parallel_size")
    chunk = seq // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)]).to(device)


def cut(tensor: torch.Tensor, dim: int, cp_group) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along its sequence dimension ``dim`` (the whole tensor without CP)."""
    if cp_group is None or cp_group.size() == 1:
        return tensor
    positions = rank_positions(tensor.shape[dim], cp_group.size(), cp_group.rank(), tensor.device)
    return tensor.index_select(dim, positions)


def attend_across_ranks(attend, query, key, value, cp_group):
    """Causal attention of this rank's queries [s/cp, b, n, d] over the keys and values of every rank: gathered
    along the sequence (their gradients reduce-scattered back), with the causal mask of the tokens' places in the
    whole sequence. ``attend(q, k, v, mask)``, mask [s/cp, s] True = masked out (Megatron's convention)."""
    size, rank = cp_group.size(), cp_group.rank()
    local = query.shape[0]
    key, value = (gather_from_sequence_parallel_region(t, group=cp_group) for t in (key, value))
    query_at = rank_positions(local * size, size, rank, query.device)
    key_at = torch.cat([rank_positions(local * size, size, r, query.device) for r in range(size)])
    return attend(query, key, value, (key_at[None, :] > query_at[:, None])[None, None])
