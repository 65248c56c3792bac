import json

import pytest
import torch

from feddiff.compress.codecs import CODECS, CodecError, make_codec
from feddiff.compress.quantize import pack_nibbles, unpack_nibbles
from feddiff.compress.wire import Message, MessageError, decode, encode, read_parts, write_parts

# (name, settings) of every codec variant
VARIANTS = [
    ("identity", {}), ("fp16", {}), ("bf16", {}),
    ("int8", {"scheme": "affine"}), ("int8", {"scheme": "channel"}),
    ("int4", {"scheme": "affine"}), ("int4", {"scheme": "channel"}),
    ("int8", {"stochastic_rounding": True}), ("int4", {"scheme": "channel", "stochastic_rounding": True}),
]  # fmt: skip
LOSSY = [v for v in VARIANTS if v[0] != "identity"]
INTS = [v for v in VARIANTS if v[0] in ("int8", "int4")]


def ids(variants):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in s.items())}".rstrip("-") for n, s in variants]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def roundtrip(codec, x, generator=None):
    """Through the codec alone (no wire)."""
    storage, params = codec.encode(x, generator or gen())
    return codec.decode(storage, params, list(x.shape), x.dtype)


def wire_roundtrip(codec, tensors, generator=None):
    return decode(encode(Message(tensors), codec, generator or gen())).tensors


# --- registry and settings --------------------------------------------------------------------


def test_registry_and_config_roundtrip():
    assert set(CODECS) == {"identity", "fp16", "bf16", "int8", "int4"}
    for name, settings in VARIANTS:
        c = make_codec(name, **settings)
        assert c.name == name and c.lossy == (name != "identity")
        again = make_codec(name, **json.loads(json.dumps(c.config())))
        assert again.config() == c.config()
    assert make_codec("int4").config() == {"scheme": "affine", "stochastic_rounding": False}


def test_bad_names_and_settings():
    names = r"\['bf16', 'fp16', 'identity', 'int4', 'int8'\]"
    with pytest.raises(ValueError, match=r"unknown codec 'int2'; choose from " + names):
        make_codec("int2")
    with pytest.raises(ValueError, match=r"scheme must be one of \['affine', 'channel'\], got 'foo'"):
        make_codec("int8", scheme="foo")
    with pytest.raises(ValueError, match="stochastic_rounding must be true or false, got 'yes'"):
        make_codec("int4", stochastic_rounding="yes")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['bits'\]; its settings are \['scheme', 'stoch"):
        make_codec("int8", bits=3)
    with pytest.raises(ValueError, match=r"codec 'fp16' has no setting\(s\) \['scheme'\]"):
        make_codec("fp16", scheme="affine")


# --- 16-bit floats ----------------------------------------------------------------------------


def test_fp16_exact_on_representable_values():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 2047.0, 2048.0, 65504.0, -65504.0, 2.0**-14, 2.0**-24, 1 / 3])
    x = x.half().float()  # 1/3 becomes its nearest fp16 value
    x = torch.cat([x, torch.randn(1000, generator=gen()).half().float()])
    c = make_codec("fp16")
    y = roundtrip(c, x)
    assert y.dtype == torch.float32 and torch.equal(y, x)
    assert c.encode(x)[0][""].dtype == torch.float16


def test_fp16_and_bf16_error_bounds():
    x = torch.randn(256, 257, generator=gen())
    y = roundtrip(make_codec("fp16"), x)
    normal = x.abs() >= 2.0**-14  # fp16 normal range: 11 significant bits
    assert ((y - x).abs() / x.abs())[normal].max() <= 2.0**-11
    assert (y - x).abs()[~normal].max() <= 2.0**-25  # subnormals: absolute error
    y = roundtrip(make_codec("bf16"), x)
    assert ((y - x).abs() / x.abs()).max() <= 2.0**-8


def test_fp16_and_bf16_saturate_instead_of_inf():
    x = torch.tensor([1e5, -1e6, 65519.0, 65520.0, 3.0])
    y = roundtrip(make_codec("fp16"), x)
    assert y.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 3.0]
    big = torch.finfo(torch.float32).max
    y = roundtrip(make_codec("bf16"), torch.tensor([big, -big]))
    assert torch.isfinite(y).all() and y[0] == torch.finfo(torch.bfloat16).max
    # float64 beyond the float32 range saturates too, and stays float64
    y = roundtrip(make_codec("fp16"), torch.tensor([1e300, -2.0], dtype=torch.float64))
    assert y.dtype == torch.float64 and y.tolist() == [65504.0, -2.0]


# --- integer codecs: error bounds -------------------------------------------------------------


@pytest.mark.parametrize("name,max_level", [("int8", 255), ("int4", 15)])
def test_affine_error_bound(name, max_level):
    x = torch.randn(64, 100, generator=gen(1)) * 3 + 1
    lo, hi = x.min().item(), x.max().item()
    scale = (hi - lo) / max_level  # by hand
    c = make_codec(name, scheme="affine")
    storage, _ = c.encode(x)
    assert storage["affine"].tolist() == pytest.approx([lo, scale], rel=1e-7)
    y = c.decode(storage, {}, [64, 100], torch.float32)
    assert (y - x).abs().max() <= scale / 2 + 1e-6 * max(abs(lo), abs(hi))
    assert y.min() == lo  # level 0 is exactly the minimum
    levels = ((y.double() - lo) / scale).round()
    assert levels.min() == 0 and levels.max() == max_level  # the grid spans exactly [min, max]


@pytest.mark.parametrize("name,max_level", [("int8", 127), ("int4", 7)])
def test_channel_error_bound(name, max_level):
    # rows spanning six orders of magnitude: one scale per output channel keeps small rows precise
    x = torch.randn(6, 4, 3, 3, generator=gen(2)) * torch.logspace(-3, 2, 6)[:, None, None, None]
    c = make_codec(name, scheme="channel")
    storage, _ = c.encode(x)
    absmax = x.reshape(6, -1).abs().amax(dim=1)
    assert torch.equal(storage["absmax"], absmax)
    y = c.decode(storage, {}, list(x.shape), torch.float32)
    err = (y - x).reshape(6, -1).abs().amax(dim=1)
    scale = absmax / max_level  # by hand, per channel
    assert (err <= scale / 2 * (1 + 1e-5)).all(), (err / scale).tolist()
    # +-absmax is level +-max_level and comes back exactly
    rows, cols = x.reshape(6, -1), y.reshape(6, -1)
    i = rows.abs().argmax(dim=1)
    assert torch.equal(cols[torch.arange(6), i], rows[torch.arange(6), i])


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_channel_one_scale_for_vectors_and_scalars(name):
    c = make_codec(name, scheme="channel")
    for x in (torch.randn(50, generator=gen()), torch.tensor(-0.7)):
        storage, _ = c.encode(x)
        assert storage["absmax"].shape == (1,) and storage["absmax"].item() == x.abs().max().item()
        y = c.decode(storage, {}, list(x.shape), x.dtype)
        assert y.shape == x.shape
        assert (y - x).abs().max() <= x.abs().max() / c.max_level / 2 * (1 + 1e-5)


def test_int8_storage_by_hand():
    # affine: min -1, max 1.55 -> scale 2.55 / 255 = 0.01; levels (x + 1) / 0.01
    s, _ = make_codec("int8").encode(torch.tensor([-1.0, 0.0, 0.5, 1.55]))
    assert s["q"].dtype == torch.uint8 and s["q"].tolist() == [0, 100, 150, 255]
    assert s["affine"].dtype == torch.float32 and s["affine"].tolist() == pytest.approx([-1.0, 0.01])
    # channel: row absmax 2.54 -> scale 0.02; an all-zero row has absmax 0 and levels 0
    s, _ = make_codec("int8", scheme="channel").encode(torch.tensor([[2.54, -1.0, 0.02], [0.0, 0.0, 0.0]]))
    assert s["q"].dtype == torch.int8 and s["q"].tolist() == [[127, -50, 1], [0, 0, 0]]
    assert s["absmax"].tolist() == pytest.approx([2.54, 0.0])


@pytest.mark.parametrize("name,settings", LOSSY, ids=ids(LOSSY))
def test_non_contiguous_input(name, settings):
    x = torch.randn(6, 4, generator=gen())
    c = make_codec(name, **settings)
    assert torch.equal(roundtrip(c, x.t(), gen(1)), roundtrip(c, x.t().contiguous(), gen(1)))


# --- int4 packing -----------------------------------------------------------------------------


def test_int4_packing_by_hand():
    # Nibble order: element 2i in the low nibble, 2i+1 in the high nibble; odd count pads a 0.
    # affine: min 0, max 15 -> scale 1, levels = values: [1, 2 | 15, 0 | 7, pad]
    x = torch.tensor([1.0, 2.0, 15.0, 0.0, 7.0])
    c = make_codec("int4", scheme="affine")
    storage, _ = c.encode(x)
    assert storage["q"].dtype == torch.uint8
    assert storage["q"].tolist() == [0x21, 0x0F, 0x07]
    assert storage["affine"].tolist() == [0.0, 1.0]
    assert torch.equal(c.decode(storage, {}, [5], torch.float32), x)
    # channel: absmax 7 -> scale 1; levels [7, -7, 0, 3, -1] travel as level + 8 = [15, 1, 8, 11, 7]
    x = torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0])
    c = make_codec("int4", scheme="channel")
    storage, _ = c.encode(x)
    assert storage["q"].tolist() == [0x1F, 0xB8, 0x07]
    assert torch.equal(c.decode(storage, {}, [5], torch.float32), x)


def test_pack_unpack_nibbles():
    v = torch.tensor([0, 15, 9, 4], dtype=torch.uint8)
    assert pack_nibbles(v).tolist() == [0xF0, 0x49]
    assert torch.equal(unpack_nibbles(pack_nibbles(v), 4), v)
    v = torch.randint(0, 16, (1001,), generator=gen(), dtype=torch.uint8)
    packed = pack_nibbles(v)
    assert packed.shape == (501,) and packed[-1] >> 4 == 0
    assert torch.equal(unpack_nibbles(packed, 1001), v)
    assert pack_nibbles(torch.zeros(0, dtype=torch.uint8)).shape == (0,)


# --- stochastic rounding ----------------------------------------------------------------------


@pytest.mark.parametrize("name,scheme", [("int8", "affine"), ("int4", "channel")])
def test_stochastic_rounding_unbiased(name, scheme):
    # Values 0.3 of a step above a level, with the grid pinned to scale 1 by the end values.
    top = 255 if (name, scheme) == ("int8", "affine") else 7
    lo = 0 if scheme == "affine" else -top
    levels = torch.randint(lo, top, (1000,), generator=gen(3)).float()
    x = torch.cat([torch.tensor([float(lo), float(top)]), levels + 0.3])
    det = roundtrip(make_codec(name, scheme=scheme), x)
    assert (det - x)[2:].abs().min() == pytest.approx(0.3, abs=1e-4)  # nearest: always 0.3 off
    c = make_codec(name, scheme=scheme, stochastic_rounding=True)
    runs = torch.stack([roundtrip(c, x, gen(seed)) for seed in range(200)])
    assert set(torch.unique(runs[:, 2:] - levels).tolist()) <= {0.0, 1.0}  # only the two neighbours
    bias = (runs.mean(dim=0) - x)[2:].abs()
    # E|mean - x| = sqrt(0.21/200) * 0.8 = 0.026 per value; nearest rounding is off by 0.3
    assert bias.mean() < 0.04 and bias.max() < 0.2
    assert torch.equal(runs[:, :2], x[:2].expand(200, 2))  # values on a level never move


def test_stochastic_rounding_deterministic_per_seed():
    x = torch.randn(100, 30, generator=gen())
    c = make_codec("int8", stochastic_rounding=True)
    a, b = c.encode(x, gen(7))[0]["q"], c.encode(x, gen(7))[0]["q"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c.encode(x, gen(8))[0]["q"])
    m = Message({"w": x, "b": x[0].clone()})
    one, two = decode(encode(m, c, gen(5))).tensors, decode(encode(m, c, gen(5))).tensors
    assert all(torch.equal(one[k], two[k]) for k in m.tensors)  # (the bytes' header order may vary)
    # rounding down or up only: within one step of x
    scale = (x.max() - x.min()).item() / 255
    assert (roundtrip(c, x, gen(9)) - x).abs().max() <= scale * (1 + 1e-5)


def test_stochastic_rounding_needs_a_generator():
    c = make_codec("int4", stochastic_rounding=True)
    with pytest.raises(CodecError, match="needs|torch.Generator"):
        c.encode(torch.randn(3), None)
    with pytest.raises(CodecError, match="torch.Generator"):
        encode(Message({"w": torch.randn(3)}), c)
    # deterministic rounding ignores the generator and does not advance it
    g = gen(1)
    state = g.get_state()
    make_codec("int8").encode(torch.randn(10), g)
    assert torch.equal(g.get_state(), state)


# --- bytes through the real wire --------------------------------------------------------------


@pytest.mark.parametrize("name,settings,lo,hi", [
    ("fp16", {}, 1.99, 2.0), ("bf16", {}, 1.99, 2.0),
    ("int8", {"scheme": "affine"}, 3.8, 4.0), ("int8", {"scheme": "channel"}, 3.8, 4.0),
    ("int4", {"scheme": "affine"}, 7.4, 8.0), ("int4", {"scheme": "channel"}, 7.4, 8.0),
])  # fmt: skip
def test_bytes_on_the_wire(name, settings, lo, hi):
    m = Message({"w": torch.randn(256, 1024, generator=gen())})
    base = len(encode(m))
    assert 256 * 1024 * 4 < base < 256 * 1024 * 4 + 400
    assert lo <= base / len(encode(m, make_codec(name, **settings))) <= hi


# --- whole state dicts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict():
    from feddiff.model.presets import build_unet, unet_kwargs

    sd = build_unet(unet_kwargs("tiny", 1, 16), 0).state_dict()
    sd["steps"] = torch.tensor([3, 4])  # non-floating: bypasses the codec
    sd["half"] = torch.randn(8, 3, generator=gen()).half()
    sd["double"] = torch.randn(5, generator=gen(), dtype=torch.float64)
    return sd


@pytest.mark.parametrize("name,settings", VARIANTS, ids=ids(VARIANTS))
def test_state_dict_roundtrip(state_dict, name, settings):
    out = wire_roundtrip(make_codec(name, **settings), state_dict)
    assert list(out) == list(state_dict)
    for k, x in state_dict.items():
        y = out[k]
        assert y.shape == x.shape and y.dtype == x.dtype, k
        if not x.is_floating_point() or name == "identity":
            assert torch.equal(y, x), k
        else:  # within one quantization step (the coarsest: int4 channel, max |x| / 7)
            assert (y.double() - x.double()).abs().max() <= x.abs().max().double() / 7 * 1.01, k


# --- degenerate inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("name,settings", LOSSY, ids=ids(LOSSY))
@pytest.mark.parametrize("shape", [(), (0,), (4, 0), (0, 4), (7,), (3, 5), (2, 3, 4)])
def test_constant_and_empty_roundtrip_exactly(name, settings, shape):
    c = make_codec(name, **settings)
    for value in (0.0, -1.25, 0.3 if name.startswith("int") else 6.5):
        x = torch.full(shape, value)
        y = wire_roundtrip(c, {"w": x})["w"]
        assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(y, x), (value, y)


@pytest.mark.parametrize("name,settings", INTS, ids=ids(INTS))
def test_constant_rows_exact_and_dtypes_kept(name, settings):
    x = torch.tensor([[0.3] * 6, [-2.1] * 6, [0.0] * 6])  # constant per channel
    c = make_codec(name, **settings)
    if settings.get("scheme") == "channel":
        assert torch.equal(roundtrip(c, x), x)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xd = torch.randn(4, 9, generator=gen()).to(dtype)
        assert roundtrip(c, xd).dtype == dtype


@pytest.mark.parametrize("name,settings", LOSSY, ids=ids(LOSSY))
def test_nan_and_inf_rejected(name, settings):
    c = make_codec(name, **settings)
    x = torch.randn(4, 6, generator=gen())
    x[1, 2] = float("nan")
    with pytest.raises(CodecError, match=r"1 NaN and 0 Inf value\(s\) \(first at index \[1, 2\]\)"):
        c.encode(x, gen())
    x[1, 2] = -float("inf")
    with pytest.raises(CodecError, match=r"0 NaN and 1 Inf"):
        encode(Message({"w": x}), c, gen())
    if name.startswith("int"):  # fp16/bf16 saturate such values instead (tested above)
        with pytest.raises(CodecError, match=r"beyond the float32 range \(max \|x\| = 1e\+300\)"):
            c.encode(torch.tensor([1e300, 0.0], dtype=torch.float64), gen())


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_huge_ranges(name):
    big = torch.tensor([-3e38, 3e38, 1.0])
    with pytest.raises(CodecError, match="wider than the float32 maximum"):
        make_codec(name, scheme="affine").encode(big)
    y = roundtrip(make_codec(name, scheme="channel"), big)
    assert torch.isfinite(y).all() and y[:2].tolist() == big[:2].tolist()


def test_identity_passes_nan_through():
    x = torch.tensor([float("nan"), 1.0])
    y = wire_roundtrip(make_codec("identity"), {"w": x})["w"]
    assert torch.isnan(y[0]) and y[1] == 1.0


# --- corrupted payloads -----------------------------------------------------------------------


def reframe(blob: bytes, mutate) -> bytes:
    """Apply ``mutate(parts, group)`` to the one group of a message (``parts``: suffix -> flat tensor,
    ``group``: the header's [codec, dtype, names, shapes]) and rebuild a frame with a valid checksum."""
    header, parts = read_parts(blob)
    mutate(parts[0], header["groups"][0])
    return write_parts(header, parts)


def replace(part, fn):
    def mutate(parts, group):
        parts[part] = fn(parts[part]).contiguous()

    return mutate


def set_group(pos, value):
    def mutate(parts, group):
        group[pos] = value

    return mutate


# Values the layout admits but the codec must refuse; each error names the tensor.
CORRUPTIONS = [
    # (codec, settings, shape, mutation, expected error)
    ("int8", {}, (6, 5), replace("affine", lambda a: torch.tensor([0.0, -1.0])), "invalid affine grid"),
    ("int8", {}, (6, 5), replace("affine", lambda a: torch.tensor([float("nan"), 1.0])), "invalid affine grid"),
    ("int8", {}, (6, 5), replace("affine", lambda a: torch.tensor([0.0, float("inf")])), "invalid affine grid"),
    ("int8", {"scheme": "channel"}, (6, 5), replace("absmax", lambda a: -a), "absmax must be finite and >= 0"),
    ("int8", {"scheme": "channel"}, (6, 5), replace("q", lambda q: q.index_fill(0, torch.tensor([0]), -128)),
     r"level -128 is outside \[-127, 127\]"),
    ("int4", {}, (5, 5), replace("q", lambda q: torch.cat([q[:-1], torch.tensor([0xF3], dtype=torch.uint8)])),
     "padding nibble of the last byte is 15"),
    ("int4", {"scheme": "channel"}, (4, 6), replace("q", lambda q: q & 0xF0), r"level -8 is outside \[-7, 7\]"),
    ("int8", {}, (6, 5), set_group(1, "int64"), "floating-point tensors only"),
]  # fmt: skip


@pytest.mark.parametrize("name,settings,shape,mutate,error", CORRUPTIONS)
def test_corrupted_payloads_rejected(name, settings, shape, mutate, error):
    blob = encode(Message({"w": torch.randn(shape, generator=gen())}), make_codec(name, **settings))
    assert decode(reframe(blob, lambda p, g: None)).tensors["w"].shape == shape  # reframing alone is fine
    with pytest.raises(MessageError, match=r"tensor 'w': .*" + error):
        decode(reframe(blob, mutate))


# Parts of another size than the header's shapes imply: refused by the frame's layout, before a value is read.
RESIZED = [
    ("int8", {}, (6, 5), replace("q", lambda q: q[:-8])),
    ("int8", {}, (6, 5), replace("q", lambda q: torch.cat([q, q[:8]]))),
    ("int8", {}, (6, 5), lambda p, g: p.pop("affine")),
    ("int8", {}, (6, 5), lambda p, g: p.update(extra=torch.zeros(2))),
    ("int8", {"scheme": "channel"}, (6, 5), replace("absmax", lambda a: a[:4])),
    ("int4", {}, (5, 5), replace("q", lambda q: torch.cat([q, torch.zeros(8, dtype=torch.uint8)]))),
    ("fp16", {}, (4, 6), replace("", lambda h: h.float())),
    ("identity", {}, (4, 6), set_group(3, [[4, 7]])),
]  # fmt: skip


@pytest.mark.parametrize("name,settings,shape,mutate", RESIZED)
def test_parts_of_another_size_rejected(name, settings, shape, mutate):
    blob = encode(Message({"w": torch.randn(shape, generator=gen())}), make_codec(name, **settings))
    with pytest.raises(MessageError, match=r"the data section is \d+ bytes; the header's groups need \d+"):
        decode(reframe(blob, mutate))


def test_bytes_in_the_padding_are_refused():
    # 30 levels take 32 bytes: a 31st byte is in the padding, where only zeros may be
    blob = encode(Message({"w": torch.randn(6, 5, generator=gen())}), make_codec("int8"))
    header, parts = read_parts(blob)
    parts[0]["q"] = torch.cat([parts[0]["q"], torch.tensor([7], dtype=torch.uint8)])
    with pytest.raises(MessageError, match="nonzero padding before byte 32"):
        decode(write_parts(header, parts))
    parts[0]["q"][-1] = 0  # a zero there is the frame the encoder writes
    assert write_parts(header, parts) == blob


# --- groups: the wire encodes many tensors at once; the result must be the per-tensor one, bit for bit ----


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes (bit for bit: torch.equal takes -0.0 for 0.0, and numpy has no bfloat16)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def mixed_state(g):
    from feddiff.compress.quantize import BLOCK

    return {
        "conv.weight": torch.randn(32, 3, 3, 3, generator=g), "conv.bias": torch.randn(32, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(64, generator=g), "norm.bias": torch.zeros(64),  # constant
        "mid": torch.randn(40, 100, generator=g) * 5,  # over Segments.TINY: one kernel of its own
        "big": torch.randn(BLOCK + 3, generator=g),  # over BLOCK, in a run with its neighbours
        "huge": torch.randn(4 * BLOCK + 5, generator=g) * 3 + 1,  # alone in its run: block by block
        "zeros+-": torch.tensor([0.0, -0.0, 0.0]), "zeros-+": torch.tensor([-0.0, 0.0]),  # the sign of a zero
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(-2.5),
        "subnormal": torch.tensor([1e-40, 3e-40, 0.0]),  # a scale that rounds to a subnormal
        "ties": torch.cat([torch.tensor([0.0, 255.0]), torch.arange(0, 255) + 0.5]),  # scale 1, every x.5: ties
        "f64": torch.randn(50, generator=g, dtype=torch.float64), "after": torch.randn(7, generator=g),
    }  # fmt: skip


@pytest.mark.parametrize("name,settings", VARIANTS, ids=ids(VARIANTS))
def test_group_encoding_equals_the_per_tensor_codec(name, settings):
    codec = make_codec(name, **settings)
    tensors = mixed_state(gen(3))
    blob = encode(Message(tensors), codec, gen(9))
    _, parts = read_parts(blob)
    out = decode(blob).tensors
    g = gen(9)  # the per-tensor codec, drawing rounding noise in the same order
    first_group = list(tensors)[: list(tensors).index("f64")]  # float32 tensors, until f64 starts a group
    expected_parts: dict = {}
    for k, x in tensors.items():
        storage, params = codec.encode(x, g)
        y = codec.decode(storage, params, list(x.shape), x.dtype)
        assert out[k].dtype == y.dtype and out[k].shape == y.shape, k
        assert raw(out[k]) == raw(y), k
        if k in first_group:
            for suffix, t in storage.items():
                expected_parts.setdefault(suffix, []).append(t.reshape(-1))
    assert sorted(parts[0]) == sorted(expected_parts)
    for suffix, ts in expected_parts.items():  # bit for bit (torch.equal takes -0.0 for 0.0)
        assert raw(parts[0][suffix]) == raw(torch.cat(ts)), suffix


def test_segments_by_hand():
    import numpy as np

    from feddiff.compress.quantize import Segments

    xs = [torch.tensor([254.0, -1.0, 1.5]), torch.zeros(0), torch.tensor([5.0]),
          torch.tensor([4.0, 4.25, 4.75, 6.0, 131.5]), torch.tensor([0.0, -0.0])]
    Segments.TINY, tiny = 3, Segments.TINY  # the 5-element tensor is read where it is, the others gathered
    try:
        s = Segments([x.numel() for x in xs])
        assert s.small == [0, 2, 4] and s.large == [(3, 4, 9)]
        grid, levels = np.full((5, 2), 7, dtype=np.float32), np.zeros(11, dtype=np.uint8)
        assert s.grid_and_levels(xs, 255, grid, levels)
        # grids [min, (max - min) / 255]; an empty tensor [0, 0]; a constant one scale 0; a zero is +0.0
        assert grid.tolist() == [[-1.0, 1.0], [0.0, 0.0], [5.0, 0.0], [4.0, 0.5], [0.0, 0.0]]
        assert not np.signbit(grid[[1, 2, 4]]).any()
        # (x+1)/1: 255, 0, 2.5 -> 2 (half to even); 5: level 0; (x-4)/0.5: 0, 0.5 -> 0, 1.5 -> 2, 4, 255; zeros
        assert levels.tolist() == [255, 0, 2, 0, 0, 0, 2, 4, 255, 0, 0]
        values = np.zeros(11, dtype=np.float32)
        s.values(levels, grid[:, 0], grid[:, 1], values)
        assert values.tolist() == [254.0, -1.0, 1.0, 5.0, 4.0, 4.0, 5.0, 6.0, 131.5, 0.0, 0.0]
        for bad in (torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0]), torch.tensor([float("inf"), 0.0, 1.0])):
            ys = [bad if x.numel() == bad.numel() else x for x in xs]
            untouched = np.full(11, 9, dtype=np.uint8)
            assert not s.grid_and_levels(ys, 255, grid, untouched) and (untouched == 9).all()
    finally:
        Segments.TINY = tiny


def test_numpy_levels_and_values_are_torch_s_bit_for_bit():
    # the int8/int4 affine arithmetic runs in numpy; torch's sub_, div_, round_ (half to even) and
    # clamp_, and to(float32).mul_().add_(), are the definition
    import numpy as np

    from feddiff.compress.quantize import Segments, dequantize_affine, quantize_affine

    g = gen(11)
    cases = [torch.randn(3000, generator=g) * 3, torch.randn(5000, generator=g) * 1e-38,
             torch.tensor([1e-44, 3e-44, 0.0, -0.0]), torch.randn(700, generator=g) * 1e37,
             torch.cat([torch.zeros(10), -torch.zeros(10), torch.ones(3)]), torch.rand(2000, generator=g) + 1e6,
             torch.full((50,), 2.5), torch.arange(0.0, 256.0) * 0.5]  # (subnormal grids, huge ranges, ties)
    for max_level in (255, 15):
        grids, levels, values = [], [], []
        for x in cases:
            lo, hi = float(x.min()) + 0.0, float(x.max()) + 0.0
            grid = torch.tensor([lo, (hi - lo) / max_level], dtype=torch.float32)
            offset, scale = grid.tolist()
            ref = x.sub(offset).div_(scale if scale else 1.0).round_().clamp_(0, max_level).to(torch.uint8)
            assert raw(quantize_affine(x, offset, scale, max_level)) == raw(ref)
            back = ref.to(torch.float32).mul_(scale).add_(offset)
            assert raw(dequantize_affine(ref, offset, scale, out=torch.empty(x.numel()))) == raw(back)
            grids.append(grid)
            levels.append(ref)
            values.append(back)
        segs = Segments([x.numel() for x in cases])  # every case at once: large ones, and small ones gathered
        grid, q = np.zeros((len(cases), 2), dtype=np.float32), np.zeros(sum(x.numel() for x in cases), dtype=np.uint8)
        assert segs.grid_and_levels(cases, max_level, grid, q)
        assert grid.tobytes() == torch.stack(grids).numpy().tobytes()
        assert q.tobytes() == torch.cat(levels).numpy().tobytes()
        out = np.zeros(q.shape[0], dtype=np.float32)
        segs.values(q, grid[:, 0], grid[:, 1], out)
        assert out.tobytes() == torch.cat(values).numpy().tobytes()
    # below the offset, levels clamp at 0 (a caller's grid need not start at the tensor's min)
    assert quantize_affine(torch.tensor([-1.0, 0.0, 1.0]), 0.0, 1 / 255, 255).tolist() == [0, 0, 255]
    assert quantize_affine(torch.tensor([0.5, 1.0], dtype=torch.bfloat16), 0.5, 0.5, 255).tolist() == [0, 1]


def test_runs_of_a_huge_layout_are_not_kept():
    from feddiff.compress.codecs import _runs, consecutive_runs

    before = _runs.cache_info().currsize
    assert consecutive_runs([1] * 5000, 2000) == ((0, 2000), (2000, 4000), (4000, 5000))
    assert _runs.cache_info().currsize == before  # (a peer's frame of many tensors leaves nothing behind)
    assert consecutive_runs([3, 5, 2, 9], 10) == ((0, 3), (3, 4))  # 3 + 5 + 2 = 10; 9 alone
