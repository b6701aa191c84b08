"""Several processes working on one Wan forward, through torch.distributed (NCCL on GPUs, gloo on CPUs).

Sequence parallel (Ulysses): each rank holds a contiguous shard of the video tokens. Everything in a
block is per token except self-attention, where one all-to-all turns [B, L/N, H, D] (a sequence shard,
all heads) into [B, L, H/N, D] (all tokens, a head shard), attention runs locally, and a second
all-to-all turns it back. Cross-attention needs no communication (each query sees the whole context).
The tokens are gathered once, after the per-token head (fewer values per token than D). Exact: the same arithmetic as one process, reordered.

CFG parallel: the conditional and unconditional passes run on two ranks at once and the two velocities
are exchanged with one all-gather.

Rank processes are started by the caller (torch.multiprocessing / torchrun); keep NVLink multicast off
in every worker (see `WORKER_ENV`).
"""
import torch
import torch.distributed as dist

# Set in every worker: NVLink multicast can take a shared host's GPUs out of service.
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class SequenceParallel:
    """Shards the token sequence of a WanDiT forward over the ranks of `group`."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.length = None  # tokens of the whole sequence, set by shard()

    def check_heads(self, heads):
        if heads % self.world:
            raise ValueError(
                f"sequence parallel over {self.world} processes needs the head count ({heads}) to be divisible "
                f"by it; use {', '.join(str(n) for n in range(1, heads + 1) if heads % n == 0 and n <= 8)} devices"
            )

    def sizes(self, length):
        """Tokens per rank: as even as possible, the first ranks take one more."""
        base, extra = divmod(length, self.world)
        return [base + (r < extra) for r in range(self.world)]

    def shard(self, x, dim=1):
        # The full token count is remembered here, so attention needs no collective to learn it.
        self.length = x.shape[dim]
        return x.split(self.sizes(self.length), dim)[self.rank]

    def gather(self, x, length, dim=1):
        """The full sequence [.., L, ..] from every rank's shard (shards may differ by one token)."""
        sizes = self.sizes(length)
        longest = max(sizes)
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad)], dim).contiguous() if pad[dim] else x.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    def _exchange(self, chunks, length_dim, lengths_in, lengths_out):
        """all-to-all of chunks whose size along `length_dim` differs by rank: gloo and NCCL want equal
        sizes, so each chunk is zero-padded to the longest and the padding dropped on arrival."""
        longest = max(max(lengths_in), max(lengths_out))
        padded = []
        for c in chunks:
            pad = list(c.shape)
            pad[length_dim] = longest - c.shape[length_dim]
            padded.append((torch.cat([c, c.new_zeros(pad)], length_dim) if pad[length_dim] else c).contiguous())
        out = [torch.empty_like(padded[0]) for _ in range(self.world)]
        dist.all_to_all(out, padded, group=self.group)
        return [o.narrow(length_dim, 0, n) for o, n in zip(out, lengths_out)]

    def attention(self, q, k, v, inner):
        """Self-attention of sequence-sharded q, k, v [B, l_rank, H, D] with `inner(q, k, v) -> [B, L, h·D]`
        running on all tokens of a head shard. Returns [B, l_rank, H·D]."""
        b, l_local, h, d = q.shape
        self.check_heads(h)
        hs = h // self.world
        sizes = self.sizes(self.length)

        def seq_to_heads(x):  # my tokens, every head shard -> every rank's tokens, my head shard
            return torch.cat(self._exchange(x.split(hs, 2), 1, [l_local] * self.world, sizes), 1)

        out = inner(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)).view(b, sum(sizes), hs, d)
        parts = self._exchange(out.split(sizes, 1), 1, sizes, [l_local] * self.world)
        return torch.cat(parts, 2).reshape(b, l_local, h * d)


def cfg_parallel_velocity(velocity, scale, group=None):
    """Rank 0 computed the conditional velocity, rank 1 the unconditional one; every rank gets
    v = v_u + g·(v_c − v_u)."""
    if dist.get_world_size(group) != 2:
        raise ValueError(f"CFG parallel runs on exactly 2 processes, not {dist.get_world_size(group)}")
    parts = [torch.empty_like(velocity) for _ in range(2)]
    dist.all_gather(parts, velocity.contiguous(), group=group)
    v_c, v_u = parts
    return v_u + scale * (v_c - v_u)
