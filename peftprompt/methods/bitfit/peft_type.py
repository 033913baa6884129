"""Add the ``BITFIT`` member to PEFT's closed ``PeftType`` enum.

`peft.utils.register_peft_method` only accepts names that are already members of `PeftType`, so an out-of-tree
method has to extend the enum first. Tested against the peft versions pinned in ``pyproject.toml``.
"""

from __future__ import annotations

from peft.utils import PeftType


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it as a new member (value == name) if it does not exist yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


BITFIT = extend_peft_type("BITFIT")
