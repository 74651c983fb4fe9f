"""Packets: typed messages, and the registry from packet type to class.

A packet is a class with annotated fields; declaring it registers it::

    class Echo(Packet, type=1000):
        text: str
        times: int = 1

Fields may be ``int`` (signed 64-bit: what both serializers and the stores carry),
``float``, ``bool``, ``str``, ``bytes``, ``Any``,
``X | None``, ``list[X]`` and ``dict[str, X]`` of those. Decoding validates every
field against its annotation and raises :class:`~bitchat.errors.ProtocolError`
(non-fatal: the request fails, the connection stays) on a missing or mistyped
field. Unknown keys are ignored, so old peers can talk to newer ones.

Every string and list has a length limit named by a setting. A field declares
its own with :class:`Limit`::

    class Tag(Packet, type=1001):
        name: Annotated[str, Limit("max_name_length")]
        labels: Annotated[list[str], Limit("max_labels")]  # a key of Settings.extra

and the rest get ``max_string_length`` (a ``str`` or ``bytes``, and each item
or key inside a list or map) or ``max_list_length`` (a list or map). A server
decodes its peers' requests with :class:`Limits` built from its own settings,
which also refuses U+0000 (NUL) in every string; ``Packet.from_dict`` and
:func:`decode_body` without limits check types only. ``Any`` is not looked
into: the frame size bounds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar, dataclass_transform

from bitchat.errors import BitchatError, ProtocolError, UsageError, codes
from bitchat.protocol.serializers import JSON, SERIALIZERS

msgspec: Any
try:
    import msgspec
except ImportError:  # the generated decoders below do it all, a little slower
    msgspec = None

_Check = Callable[[Any], Any]
P = TypeVar("P", bound="Packet")

SYSTEM_TYPES = range(0, 100)
IM_TYPES = range(100, 1000)
USER_TYPES_START = 1000
MAX_TYPE = 0xFFFF


class _Invalid(BitchatError):
    """A field value that fails validation; decode turns it into a ProtocolError."""

    def __init__(self, what: str, code: str = codes.INVALID_PACKET) -> None:
        super().__init__(what)
        self.code = code


INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1


def _check_int(v: Any) -> Any:
    if type(v) is int and INT_MIN <= v <= INT_MAX:
        return v
    raise _Invalid("a 64-bit integer")


def _check_float(v: Any) -> Any:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _Invalid("a number")


def _check_bool(v: Any) -> Any:
    if v is True or v is False:
        return v
    raise _Invalid("a boolean")


def _check_str(v: Any) -> Any:
    if type(v) is str:
        return v
    raise _Invalid("a string")


def _check_bytes(v: Any) -> Any:
    if type(v) is bytes:
        return v
    raise _Invalid("bytes")


def _check_any(v: Any) -> Any:
    return v


_SIMPLE: dict[Any, _Check] = {
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    str: _check_str,
    bytes: _check_bytes,
    Any: _check_any,
    object: _check_any,
}


def _checker(tp: Any) -> _Check:
    """Build a validating converter for one annotation."""
    simple = _SIMPLE.get(tp)
    if simple is not None:
        return simple
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise UsageError(f"unsupported union field type {tp!r}: only X | None")
        check_inner = _checker(inner[0])

        def check_optional(v: Any) -> Any:
            return None if v is None else check_inner(v)

        return check_optional
    if origin is list:
        check_item = _checker(args[0]) if args else _check_any

        def check_list(v: Any) -> Any:
            if type(v) is not list:
                raise _Invalid("a list")
            return [check_item(x) for x in v]

        return check_list
    if origin is dict:
        if args and args[0] is not str:
            raise UsageError(f"unsupported dict key type in {tp!r}: keys must be str")
        check_value = _checker(args[1]) if args else _check_any

        def check_dict(v: Any) -> Any:
            if type(v) is not dict:
                raise _Invalid("a map")
            out = {}
            for k, x in v.items():
                if type(k) is not str:
                    raise _Invalid("a map with string keys")
                out[k] = check_value(x)
            return out

        return check_dict
    raise UsageError(f"unsupported field type {tp!r}")


# Length limits.

MAX_STRING = "max_string_length"
"""The setting that bounds a string (or bytes) field without a :class:`Limit` of its own."""
MAX_LIST = "max_list_length"
"""The setting that bounds a list (or map) field without a :class:`Limit` of its own."""


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """A field's length limit, named by a setting: ``Annotated[str, Limit("max_name_length")]``.

    The bound is that setting's value where the packet is decoded (see
    :class:`Limits`): characters of a ``str``, bytes of ``bytes``, items of a
    list or map. A longer value fails the request with ``code``.
    """

    setting: str
    code: str = codes.INVALID_PACKET


def _split_limit(tp: Any) -> tuple[Any, Limit | None]:
    """``(type, Limit)`` of a possibly ``Annotated`` annotation."""
    if typing.get_origin(tp) is typing.Annotated:
        found = [m for m in tp.__metadata__ if isinstance(m, Limit)]
        if len(found) > 1:
            raise UsageError(f"more than one Limit on {tp!r}")
        return tp.__origin__, (found[0] if found else None)
    return tp, None


def _check_limit_placement(tp: Any, where: str) -> None:
    """Refuse a Limit on a type it cannot bound, where the packet is declared."""
    tp, limit = _split_limit(tp)
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if limit is not None and arg is not type(None):
                _check_limit_placement(typing.Annotated[arg, limit], where)
            else:
                _check_limit_placement(arg, where)
        return
    if limit is not None and tp not in (str, bytes) and origin not in (list, dict):
        raise UsageError(f"{where}: a Limit bounds str, bytes, list or dict, not {tp!r}")
    for arg in typing.get_args(tp):
        _check_limit_placement(arg, where)


def _check_str_limits(v: str, limit: int, limited_by: str, code: str) -> None:
    """Raise for a string over ``limit`` characters, or with a NUL in it."""
    if len(v) > limit:
        raise _Invalid(f"at most {limit} characters ({limited_by}), not {len(v)}", code)
    if "\x00" in v:
        raise _Invalid("a string without U+0000 (NUL)")


def _bad_str(cls: type, name: str, v: Any, limit: int, limited_by: str, code: str) -> ProtocolError:
    """The error of a str field that failed its inline check (called only then)."""
    try:
        if type(v) is not str:
            raise _Invalid("a string")
        _check_str_limits(v, limit, limited_by, code)
    except _Invalid as exc:
        return _bad_field(cls, name, exc)
    raise AssertionError("the inline check and _bad_str disagree")


def _bad_bytes(cls: type, name: str, v: Any, limit: int, limited_by: str) -> ProtocolError:
    if type(v) is not bytes:
        return _bad_field(cls, name, "bytes")
    return _bad_field(cls, name, f"at most {limit} bytes ({limited_by}), not {len(v)}")


def _limited_checker(tp: Any, limits: Limits, limit: Limit | None = None) -> _Check:
    """A validating converter for one annotation that also enforces length limits."""
    tp, own = _split_limit(tp)
    limit = own or limit
    if tp is str or tp is bytes:
        setting = limit.setting if limit is not None else MAX_STRING
        n = limits.value(setting)
        code = limit.code if limit is not None else codes.INVALID_PACKET
        if tp is bytes:

            def check_bytes(v: Any) -> Any:
                if type(v) is not bytes:
                    raise _Invalid("bytes")
                if len(v) > n:
                    raise _Invalid(f"at most {n} bytes ({setting}), not {len(v)}", code)
                return v

            return check_bytes

        def check_str(v: Any) -> Any:
            if type(v) is not str:
                raise _Invalid("a string")
            if len(v) > n or "\x00" in v:
                _check_str_limits(v, n, setting, code)
            return v

        return check_str
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise UsageError(f"unsupported union field type {tp!r}: only X | None")
        check_inner = _limited_checker(inner[0], limits, limit)

        def check_optional(v: Any) -> Any:
            return None if v is None else check_inner(v)

        return check_optional
    if origin is list or origin is dict:
        setting = limit.setting if limit is not None else MAX_LIST
        n = limits.value(setting)
        code = limit.code if limit is not None else codes.INVALID_PACKET
        if origin is list:
            check_item = _limited_checker(args[0], limits) if args else _check_any

            def check_list(v: Any) -> Any:
                if type(v) is not list:
                    raise _Invalid("a list")
                if len(v) > n:
                    raise _Invalid(f"a list of at most {n} items ({setting}), not {len(v)}", code)
                try:
                    return [check_item(x) for x in v]
                except _Invalid as exc:
                    raise _Invalid(f"a list whose items are each {exc}", exc.code) from None

            return check_list
        if args and args[0] is not str:
            raise UsageError(f"unsupported dict key type in {tp!r}: keys must be str")
        check_key = _limited_checker(str, limits)
        check_value = _limited_checker(args[1], limits) if args else _check_any

        def check_dict(v: Any) -> Any:
            if type(v) is not dict:
                raise _Invalid("a map")
            if len(v) > n:
                raise _Invalid(f"a map of at most {n} items ({setting}), not {len(v)}", code)
            out = {}
            for k, x in v.items():
                try:
                    k = check_key(k)
                except _Invalid as exc:
                    raise _Invalid(f"a map whose keys are each {exc}", exc.code) from None
                try:
                    out[k] = check_value(x)
                except _Invalid as exc:
                    raise _Invalid(f"a map whose values are each {exc}", exc.code) from None
            return out

        return check_dict
    return _checker(tp)


# Generated codecs. Every body on the wire passes through ``from_dict`` or
# ``to_dict``; one function per class, with the field names and the checks of
# simple types written out, does in one call what the generic loop does in a
# call per field (SendP2P: 0.85 -> 0.4 us). They behave exactly as the generic
# ``Packet.from_dict`` / ``Packet.to_dict``, which remain for classes whose
# annotations do not resolve yet and for overrides that call ``super()``.

_MISSING: Any = object()
_GENERATED = "__bitchat_generated__"

# Inline checks of the simple types: (condition that the value is bad, expected).
_INLINE: dict[Any, tuple[str, str]] = {
    int: (
        f"type({{v}}) is not int or not {INT_MIN} <= {{v}} <= {INT_MAX}",
        "a 64-bit integer",
    ),
    bool: ("{v} is not True and {v} is not False", "a boolean"),
    str: ("type({v}) is not str", "a string"),
    bytes: ("type({v}) is not bytes", "bytes"),
}


def _bad_field(cls: type, name: str, what: object) -> ProtocolError:
    code = what.code if isinstance(what, _Invalid) else codes.INVALID_PACKET
    return ProtocolError(code, f"{cls.__name__}: field {name!r} must be {what}", fatal=False)


def _missing_field(cls: type, name: str) -> ProtocolError:
    return ProtocolError(
        codes.INVALID_PACKET, f"{cls.__name__}: missing field {name!r}", fatal=False
    )


def _not_a_map(cls: type) -> ProtocolError:
    return ProtocolError(codes.INVALID_PACKET, f"{cls.__name__}: body must be a map", fatal=False)


def _inherits_generated(cls: type, name: str) -> bool:
    """Whether ``cls`` may get a generated ``name``: neither it nor a base overrides it."""
    if name in cls.__dict__:
        return False
    inherited = getattr(cls, name)
    func = getattr(inherited, "__func__", inherited)
    generic = Packet.__dict__[name]
    return func is getattr(generic, "__func__", generic) or getattr(func, _GENERATED, False)


def _compile(name: str, lines: list[str], env: dict[str, Any]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), env, namespace)  # the source holds field names and limits
    func: Callable[..., Any] = namespace[name]
    setattr(func, _GENERATED, True)
    return func


def _compile_to_dict(cls: type[Packet]) -> Callable[[Packet], dict[str, Any]]:
    items = ", ".join(f"{n!r}: self.{n}" for n in cls._fields)
    func = _compile("to_dict", ["def to_dict(self):", f"    return {{{items}}}"], {})
    func.__doc__ = Packet.to_dict.__doc__
    func.__qualname__ = f"{cls.__qualname__}.to_dict"
    return func


def _compile_from_dict(
    cls: type[Packet], hints: dict[str, Any], limits: Limits | None = None
) -> Callable[..., Any]:
    """``cls.from_dict``; with ``limits`` (and ``hints`` with their ``Annotated``
    extras), a decoder that also enforces the fields' length limits with those values."""
    env: dict[str, Any] = {
        "_MISSING": _MISSING,
        "_Invalid": _Invalid,
        "_bad": _bad_field,
        "_bad_str": _bad_str,
        "_bad_bytes": _bad_bytes,
        "_missing": _missing_field,
        "_not_a_map": _not_a_map,
    }
    if limits is not None:
        env["cls"] = cls  # a decoder of this class alone, called with the data only
    lines = [
        "def from_dict(data):" if limits is not None else "def from_dict(cls, data):",
        "    if type(data) is not dict:",
        "        raise _not_a_map(cls)",
        "    get = data.get",
    ]
    args = []
    for i, f in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        v, name = f"v{i}", f.name
        lines.append(f"    {v} = get({name!r}, _MISSING)")
        lines.append(f"    if {v} is _MISSING:")
        if f.default is not dataclasses.MISSING:
            env[f"_d{i}"] = f.default
            lines += [f"        {v} = _d{i}", "    else:"]
            pad = "        "
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_f{i}"] = f.default_factory
            lines += [f"        {v} = _f{i}()", "    else:"]
            pad = "        "
        else:
            lines.append(f"        raise _missing(cls, {name!r})")
            pad = "    "
        tp, limit = _split_limit(hints[name])
        inline = _INLINE.get(tp)
        if limits is not None and (tp is str or tp is bytes):
            # Written out: a comparison per check (SendP2P's text and client_msg_id).
            setting = limit.setting if limit is not None else MAX_STRING
            code = limit.code if limit is not None else codes.INVALID_PACKET
            n = limits.value(setting)
            if tp is str:
                lines += [
                    f"{pad}if type({v}) is not str or len({v}) > {n} or '\\x00' in {v}:",
                    f"{pad}    raise _bad_str(cls, {name!r}, {v}, {n}, {setting!r}, {code!r})",
                ]
            else:
                lines += [
                    f"{pad}if type({v}) is not bytes or len({v}) > {n}:",
                    f"{pad}    raise _bad_bytes(cls, {name!r}, {v}, {n}, {setting!r})",
                ]
        elif limits is not None and inline is None and tp is not Any and tp is not object:
            env[f"_c{i}"] = _limited_checker(hints[name], limits)
            lines += [
                f"{pad}try:",
                f"{pad}    {v} = _c{i}({v})",
                f"{pad}except _Invalid as exc:",
                f"{pad}    raise _bad(cls, {name!r}, exc) from None",
            ]
        elif inline is not None:
            cond, what = inline
            lines += [
                f"{pad}if {cond.format(v=v)}:",
                f"{pad}    raise _bad(cls, {name!r}, {what!r})",
            ]
        elif tp is Any or tp is object:
            lines.append(f"{pad}pass")
        else:
            env[f"_c{i}"] = _checker(tp)
            lines += [
                f"{pad}try:",
                f"{pad}    {v} = _c{i}({v})",
                f"{pad}except _Invalid as exc:",
                f"{pad}    raise _bad(cls, {name!r}, exc) from None",
            ]
        # Positional where __init__ takes it so (a keyword call costs twice as much).
        args.append(v if f.init and not f.kw_only else f"{name}={v}")
    lines.append(f"    return cls({', '.join(args)})")
    func = _compile("from_dict", lines, env)
    func.__doc__ = Packet.from_dict.__doc__
    func.__qualname__ = f"{cls.__qualname__}.from_dict"
    return func


@dataclass_transform()
class Packet:
    """Base class of every packet.

    Subclasses name their wire type with a class keyword (``type=1000``) and may
    set ``pool=True`` to ask, by default, to be handled off the I/O loop (the
    seed's "sync" field; a client may override it per request). They become
    dataclasses; their fields are the packet's body.
    """

    TYPE: ClassVar[int] = -1
    POOL: ClassVar[bool] = False
    _fields: ClassVar[tuple[str, ...]] = ()
    _spec: ClassVar[tuple[tuple[str, _Check, bool], ...] | None] = None

    def __init_subclass__(
        cls,
        *,
        type: int | None = None,
        pool: bool | None = None,
        register: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if pool is not None:
            cls.POOL = pool
        dataclasses.dataclass(cls)
        cls._fields = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        cls._spec = None
        if _inherits_generated(cls, "to_dict"):
            cls.to_dict = _compile_to_dict(cls)  # type: ignore[method-assign,assignment]
        # Refuse an unsupported field type where it is declared, not at first use; an
        # annotation that does not resolve yet (NameError) is checked at first use.
        with contextlib.suppress(NameError):
            cls._build_spec()
        if type is not None:
            if not 0 <= type <= MAX_TYPE:
                raise UsageError(f"packet type {type} is outside 0..{MAX_TYPE}")
            cls.TYPE = type
            if register:
                registry.register(cls)

    @classmethod
    def _build_spec(cls) -> tuple[tuple[str, _Check, bool], ...]:
        hints = typing.get_type_hints(cls)
        for name, tp in typing.get_type_hints(cls, include_extras=True).items():
            if name in cls._fields:
                _check_limit_placement(tp, f"{cls.__name__}.{name}")
        spec = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            spec.append((f.name, _checker(hints[f.name]), required))
        cls._spec = tuple(spec)
        if _inherits_generated(cls, "from_dict"):
            cls.from_dict = classmethod(_compile_from_dict(cls, hints))  # type: ignore[assignment]
        return cls._spec

    def to_dict(self) -> dict[str, Any]:
        """The body map of this packet."""
        return {name: getattr(self, name) for name in self._fields}

    @classmethod
    def from_dict(cls: type[P], data: Any) -> P:
        """Validate a decoded body map and build the packet.

        Raises a non-fatal :class:`ProtocolError` (``invalid_packet``).
        """
        if type(data) is not dict:
            raise ProtocolError(
                codes.INVALID_PACKET, f"{cls.__name__}: body must be a map", fatal=False
            )
        spec = cls._spec or cls._build_spec()
        kwargs = {}
        for name, check, required in spec:
            try:
                value = data[name]
            except KeyError:
                if required:
                    raise ProtocolError(
                        codes.INVALID_PACKET,
                        f"{cls.__name__}: missing field {name!r}",
                        fatal=False,
                    ) from None
                continue
            try:
                kwargs[name] = check(value)
            except _Invalid as exc:
                raise ProtocolError(
                    codes.INVALID_PACKET,
                    f"{cls.__name__}: field {name!r} must be {exc}",
                    fatal=False,
                ) from None
        return cls(**kwargs)


class Registry:
    """Maps packet type numbers to packet classes; refuses duplicates."""

    def __init__(self) -> None:
        self._by_type: dict[int, type[Packet]] = {}

    def register(self, cls: type[P]) -> type[P]:
        existing = self._by_type.get(cls.TYPE)
        if existing is not None and existing is not cls:
            raise UsageError(
                f"packet type {cls.TYPE} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}; "
                f"cannot register {cls.__module__}.{cls.__qualname__}"
            )
        self._by_type[cls.TYPE] = cls
        return cls

    def unregister(self, cls: type[Packet]) -> None:
        if self._by_type.get(cls.TYPE) is cls:
            del self._by_type[cls.TYPE]

    def get(self, type_: int) -> type[Packet] | None:
        return self._by_type.get(type_)

    def __contains__(self, type_: object) -> bool:
        return type_ in self._by_type

    def __iter__(self) -> Iterator[type[Packet]]:
        return iter(self._by_type.values())


#: The default registry every ``Packet`` subclass with a ``type=`` joins.
registry = Registry()


class Limits:
    """Decoders that enforce the length limits packets declare, with one side's values.

    ``source`` holds the values: a :class:`~bitchat.Settings` (the attribute of a
    limit's name, else that key of its ``extra`` table) or a mapping. Each class
    gets its decoder at its first use, or from :meth:`prepare`, with the values
    read then and written into it as constants: a limit costs one comparison.
    Its decoders also refuse U+0000 (NUL) in any string: PostgreSQL cannot store
    it, so it is refused on the way in, the same in every mode.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._decoders: dict[type[Packet], Callable[[Any], Packet]] = {}
        self._fast: dict[type[Packet], Callable[[bytes], Packet | None] | None] = {}

    def value(self, name: str) -> int:
        """The bound a limit named ``name`` stands for."""
        source = self.source
        if isinstance(source, Mapping):
            found = source.get(name, _MISSING)
        else:
            found = getattr(source, name, _MISSING)
            if found is _MISSING:
                extra = getattr(source, "extra", None)
                found = extra.get(name, _MISSING) if isinstance(extra, Mapping) else _MISSING
        if found is _MISSING:
            raise UsageError(f"no setting {name!r} for a packet field's Limit")
        if type(found) is not int or found < 0:
            raise UsageError(f"the limit {name!r} must be an integer >= 0, not {found!r}")
        return found

    def from_dict(self, cls: type[P]) -> Callable[[Any], P]:
        """``cls.from_dict`` with the limits enforced."""
        try:
            return self._decoders[cls]  # type: ignore[return-value]
        except KeyError:
            decoder = self._decoders[cls] = self._compile(cls)
            return decoder  # type: ignore[return-value]

    def fast_json(self, cls: type[P]) -> Callable[[bytes], P | None] | None:
        """A decoder of a JSON body straight to a ``cls`` packet (msgspec, in C), for
        the bodies it can take whole: None from it means "decode the usual way",
        which then accepts the body or names what is wrong with it. None: ``cls``
        has a field it does not cover (or msgspec is not installed)."""
        try:
            return self._fast[cls]  # type: ignore[return-value]
        except KeyError:
            fast = self._fast[cls] = _compile_fast_json(cls, self)
            return fast

    def prepare(self, classes: Iterable[type[Packet]]) -> None:
        """Build the decoders of ``classes`` now: a Limit that names no setting is a
        :class:`UsageError` here (a server's start), not at a peer's first request."""
        for cls in classes:
            self.from_dict(cls)

    def _compile(self, cls: type[Packet]) -> Callable[[Any], Packet]:
        hints = typing.get_type_hints(cls, include_extras=True)
        if cls._spec is None:
            cls._build_spec()  # annotations that did not resolve at declaration
        if _decodes_by_fields(cls):
            return _compile_from_dict(cls, hints, self)
        # A class with a from_dict of its own: its fields are checked once it is built.
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        checks = [(f.name, _limited_checker(hints[f.name], self)) for f in fields]

        def decode(data: Any) -> Packet:
            packet = cls.from_dict(data)
            for name, check in checks:
                try:
                    check(getattr(packet, name))
                except _Invalid as exc:
                    raise _bad_field(cls, name, exc) from None
            return packet

        return decode

    def decode_body(self, cls: type[P], serializer: int, body: bytes, request_id: int = 0) -> P:
        """:func:`decode_body` with the limits enforced."""
        return decode_body(cls, serializer, body, request_id, self)


def decode_body(
    cls: type[P], serializer: int, body: bytes, request_id: int = 0, limits: Limits | None = None
) -> P:
    """Deserialize and validate ``body`` as a ``cls`` packet (with ``limits``, if given).

    Raises a non-fatal :class:`ProtocolError` carrying ``request_id``.
    """
    if serializer == JSON and limits is not None:
        fast = limits.fast_json(cls)
        if fast is not None:
            packet = fast(body)
            if packet is not None:
                return packet
    try:
        data = SERIALIZERS[serializer].loads(body)
    except Exception as exc:
        raise ProtocolError(
            codes.BAD_BODY, f"body does not deserialize: {exc}", fatal=False, request_id=request_id
        ) from None
    # Outside the try: a Limit naming no setting is the program's error, not the peer's.
    decode = cls.from_dict if limits is None else limits.from_dict(cls)
    try:
        return decode(data)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    except Exception as exc:  # a field validator raised something unexpected
        raise ProtocolError(
            codes.INVALID_PACKET, str(exc), fatal=False, request_id=request_id
        ) from None


def _decodes_by_fields(cls: type[Packet]) -> bool:
    """Whether ``cls`` decodes with the generic or a generated ``from_dict`` (what its
    fields say), not one of its own."""
    func = cls.__dict__.get("from_dict", cls.from_dict)
    func = getattr(func, "__func__", func)
    return bool(getattr(func, _GENERATED, False)) or func is Packet.__dict__["from_dict"].__func__


def _compile_fast_json(cls: type[P], limits: Limits) -> Callable[[bytes], P | None] | None:
    """:meth:`Limits.fast_json`'s decoder of ``cls``: a msgspec Struct of its fields,
    with the same bounds as the generated ``from_dict`` (64-bit integers, the limits'
    lengths), then what msgspec does not check (NUL in a string) and a map field
    that is not empty go the usual way. So it accepts a subset of what the usual
    way accepts, with the same result, and never decides an error."""
    if msgspec is None:
        return None
    if cls._spec is None:
        cls._build_spec()
    if not _decodes_by_fields(cls):
        return None  # a from_dict of its own: only it knows what it accepts
    hints = typing.get_type_hints(cls, include_extras=True)
    word = typing.Annotated[int, msgspec.Meta(ge=INT_MIN, le=INT_MAX)]
    fields: list[tuple[str, Any, Any]] = []
    env: dict[str, Any] = {"cls": cls}
    checks: list[str] = []
    args: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp, limit = _split_limit(hints[f.name])
        v = f"s.{f.name}"
        if tp is int:
            kind: Any = word
        elif tp is bool:
            kind = bool
        elif tp is str:
            n = limits.value(limit.setting if limit is not None else MAX_STRING)
            kind = typing.Annotated[str, msgspec.Meta(max_length=n)]
            checks.append(f"'\\x00' in {v}")
        elif typing.get_origin(tp) is list and typing.get_args(tp) in ((int,),):
            n = limits.value(limit.setting if limit is not None else MAX_LIST)
            kind = typing.Annotated[list[word], msgspec.Meta(max_length=n)]
        elif typing.get_origin(tp) is dict and typing.get_args(tp) == (str, Any):
            kind = dict[str, Any]
            checks.append(v)  # its keys and values are checked the usual way
        else:
            return None
        if f.default is not dataclasses.MISSING:
            fields.append((f.name, kind, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind, msgspec.NODEFAULT))
        args.append(v if f.init and not f.kw_only else f"{f.name}={v}")
    # Unknown keys go the usual way: msgspec skips their values without checking
    # them all (bad UTF-8, 1e400), where orjson refuses the body.
    struct = msgspec.defstruct(
        f"{cls.__name__}Body", fields, kw_only=True, forbid_unknown_fields=True
    )
    env["decode"] = msgspec.json.Decoder(struct).decode
    lines = [
        "def fast(body):",
        "    try:",
        "        s = decode(body)",
        "    except Exception:",  # anything (a RecursionError too): the usual way decides
        "        return None",
    ]
    if checks:
        lines += [f"    if {' or '.join(checks)}:", "        return None"]
    lines.append(f"    return cls({', '.join(args)})")
    return _compile("fast", lines, env)


def encode_body(packet: Packet, serializer: int) -> bytes:
    """Serialize a packet's body."""
    return SERIALIZERS[serializer].dumps(packet.to_dict())


# System packets (types 0-99).


class Ping(Packet, type=1):
    """Heartbeat request; answered inline with :class:`Pong`."""


class Pong(Packet, type=2):
    """Heartbeat answer."""


class Error(Packet, type=3):
    """A failed request: a stable ``code`` and a human ``message``."""

    code: str
    message: str = ""
