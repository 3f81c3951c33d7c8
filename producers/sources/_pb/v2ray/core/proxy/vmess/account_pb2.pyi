from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("id", "alter_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALTER_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    alter_id: int
    def __init__(self, id: _Optional[str] = ..., alter_id: _Optional[int] = ...) -> None: ...
