"""`record`: collections.namedtuple's shape without importing collections.

The helpers' small value types (Config, TokenRequest, Endpoint, ...) are named tuples.
`collections` costs about 3 ms to import here, and namedtuple builds each class with
`exec` (a fraction of a millisecond more per class): together more than all of the
helper's own work on a credential request through the agent. `record` makes the same
kind of class from builtins alone: a tuple subclass whose fields are properties, built
with keyword or positional arguments and defaults, with `_replace` and `_fields`.

The type checker sees collections.namedtuple itself (TYPE_CHECKING below), so every
record is checked exactly as a named tuple is, and at run time these behave as one:
equal to the plain tuple of their fields, hashable, unpackable, picklable.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import namedtuple as record
else:
    import sys
    from _operator import itemgetter  # built in: no import cost

    _MISSING = object()

    def record(typename, field_names, *, defaults=()):
        fields = tuple(field_names.split()) if isinstance(field_names, str) else tuple(field_names)
        defaults = tuple(defaults)
        if len(set(fields)) != len(fields) or not all(f.isidentifier() and not f.startswith("_") for f in fields):
            raise ValueError(f"{typename}: field names must be distinct identifiers without a leading _")
        if len(defaults) > len(fields):
            raise TypeError(f"{typename}: more defaults than fields")
        count, required = len(fields), len(fields) - len(defaults)
        index = {name: i for i, name in enumerate(fields)}

        def __new__(cls, *args, **kwargs):
            if len(args) > count:
                raise TypeError(f"{typename}() takes {count} arguments but {len(args)} were given")
            values = list(args) + [_MISSING] * (count - len(args))
            for name, value in kwargs.items():
                i = index.get(name)
                if i is None or values[i] is not _MISSING:
                    raise TypeError(f"{typename}() got an unexpected or repeated argument {name!r}")
                values[i] = value
            for i in range(len(args), count):
                if values[i] is _MISSING:
                    if i < required:
                        raise TypeError(f"{typename}() missing required argument {fields[i]!r}")
                    values[i] = defaults[i - required]
            return tuple.__new__(cls, values)

        def _replace(self, **changes):
            values = [changes.pop(name, value) for name, value in zip(fields, self, strict=True)]
            if changes:
                raise ValueError(f"{typename}._replace got unexpected field names {sorted(changes)!r}")
            return tuple.__new__(type(self), values)

        def __repr__(self):
            return f"{type(self).__name__}({', '.join(f'{n}={v!r}' for n, v in zip(fields, self, strict=True))})"

        def __getnewargs__(self):
            return tuple(self)

        namespace = {
            # Where the class is defined, as namedtuple records it: pickle finds it there.
            "__module__": sys._getframe(1).f_globals.get("__name__", "__main__"),
            "__slots__": (),
            "__new__": __new__,
            "__repr__": __repr__,
            "__getnewargs__": __getnewargs__,
            "__match_args__": fields,
            "_replace": _replace,
            "_fields": fields,
            "_field_defaults": dict(zip(fields[required:], defaults, strict=True)),
        }
        for i, name in enumerate(fields):
            namespace[name] = property(itemgetter(i), doc=f"Alias for field number {i}")
        return type(typename, (tuple,), namespace)
