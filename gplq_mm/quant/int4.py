"""Signed 4-bit codes packed two per byte (the storage of integer layers)."""
import torch
from torch import Tensor

def pack_int4(codes: Tensor) -> Tensor:
    """Pack signed 4-bit codes (values in [-8, 7]) two per uint8 along the last dim.

    An odd last dimension is padded with one zero code; :func:`unpack_int4`
    needs the original length to drop it.
    """
    c = codes.detach()
    if c.is_floating_point():
        c = c.round()
    # check before the integer cast: a cast would wrap e.g. 65539 to 3
    if not bool(((c >= -8) & (c <= 7)).all()):  # also rejects NaN
        raise ValueError('pack_int4 takes codes in [-8, 7]; quantize to 4 bits '
                         'before packing.')
    c = c.to(torch.int16)
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    u = (c & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


_INT4_PAIRS = {}


def unpack_int4_float(packed: Tensor, length: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """``unpack_int4(packed, length).to(dtype)`` with two allocations.

    Each byte is looked up in a 256 x 2 table of its (low, high) codes, so
    the integer layers do not build five int16/int8 temporaries of the
    weight's size on every forward.
    """
    if not 0 <= length <= 2 * packed.shape[-1]:
        raise ValueError(f'unpack_int4: length {length} does not fit in '
                         f'{packed.shape[-1]} packed bytes (2 codes each).')
    key = (dtype, packed.device)
    lut = _INT4_PAIRS.get(key)
    if lut is None:
        b = torch.arange(256)
        lut = torch.stack([b & 0xF, b >> 4], dim=1)
        lut = torch.where(lut > 7, lut - 16, lut).to(dtype).to(packed.device)
        _INT4_PAIRS[key] = lut
    out = torch.nn.functional.embedding(packed.to(torch.int32), lut)
    out = out.flatten(-2)
    return out if out.shape[-1] == length else out[..., :length]


def unpack_int4(packed: Tensor, length: int) -> Tensor:
    """Inverse of :func:`pack_int4`; returns int8 codes with last dim ``length``."""
    if not 0 <= length <= 2 * packed.shape[-1]:
        raise ValueError(f'unpack_int4: length {length} does not fit in '
                         f'{packed.shape[-1]} packed bytes (2 codes each).')
    lo = (packed & 0xF).to(torch.int16)
    hi = ((packed >> 4) & 0xF).to(torch.int16)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :length]
    out = torch.where(out > 7, out - 16, out)
    return out.to(torch.int8)
