"""Weight sync from VeRL's trainer process to the M1 server actor on the same device, in byte buckets.

The trainer side packs the `(name, tensor)` stream of VeRL's `get_per_tensor_param()` into one flat byte
buffer. Each full bucket goes to the server as a CUDA IPC handle of that buffer (same GPU: no copy through the
host) or, for CPU tensors, as the buffer itself (Ray pickles it). The server views the tensors in the buffer
and the engine copies them into its fixed parameter buffers. Tensors keep their dtype (the trainer's fp32
master weights; the engine casts as it copies, so its fp32 Mamba parameters lose nothing).
"""

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import torch

ALIGN = 256  # byte alignment of each tensor in a bucket: any dtype can be viewed there


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in bytes, within the bucket


def share(buffer: torch.Tensor) -> tuple[str, object]:
    """What crosses the process boundary for one bucket buffer."""
    if buffer.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        return "cuda_ipc", reduce_tensor(buffer)
    return "tensor", buffer


def open_shared(shared: tuple[str, object]) -> torch.Tensor:
    """The bucket buffer in the receiving process (inverse of `share`)."""
    kind, payload = shared
    if kind == "tensor":
        return payload
    rebuild, args = payload
    args = list(args)
    args[6] = torch.cuda.current_device()  # storage_device: both processes see the one GPU, maybe under another index
    return rebuild(*args)


def unpack(buffer: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a received bucket."""
    out = []
    for m in metas:
        nbytes = m.dtype.itemsize * torch.Size(m.shape).numel()
        out.append((m.name, buffer[m.offset:m.offset + nbytes].view(m.dtype).view(m.shape)))
    return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


async def send_weights(weights: Iterable[tuple[str, torch.Tensor]],
                       send: Callable[[tuple[str, object], list[TensorMeta]], Awaitable], bucket_bytes: int) -> int:
    """Pack `weights` into buckets of `bucket_bytes` and `await send(shared_buffer, metas)` for each; a tensor larger
    than a bucket travels alone in a buffer of its size. The whole iterable is consumed (VeRL's generator runs a
    collective per tensor, so every rank must drain it). Returns the number of tensors sent."""
    buffer, metas, used, count = None, [], 0, 0

    async def flush(buf, metas):
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()  # the receiver reads on its own stream
        await send(share(buf), metas)

    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > bucket_bytes:
            alone = torch.empty(nbytes, dtype=torch.uint8, device=tensor.device)
            alone.copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
            await flush(alone, [TensorMeta(name, tensor.dtype, tuple(tensor.shape), 0)])
        else:
            if buffer is None:
                buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=tensor.device)
            if used + nbytes > bucket_bytes:
                await flush(buffer, metas)
                metas, used = [], 0
            buffer[used:used + nbytes].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
            metas.append(TensorMeta(name, tensor.dtype, tuple(tensor.shape), used))
            used = _aligned(used + nbytes)
        count += 1
    if metas:
        await flush(buffer, metas)
    return count
