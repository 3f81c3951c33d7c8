from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CipherType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN: _ClassVar[CipherType]
    AES_128_GCM: _ClassVar[CipherType]
    AES_256_GCM: _ClassVar[CipherType]
    CHACHA20_POLY1305: _ClassVar[CipherType]
    NONE: _ClassVar[CipherType]
UNKNOWN: CipherType
AES_128_GCM: CipherType
AES_256_GCM: CipherType
CHACHA20_POLY1305: CipherType
NONE: CipherType

class Account(_message.Message):
    __slots__ = ("password", "cipher_type")
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    CIPHER_TYPE_FIELD_NUMBER: _ClassVar[int]
    password: str
    cipher_type: CipherType
    def __init__(self, password: _Optional[str] = ..., cipher_type: _Optional[_Union[CipherType, str]] = ...) -> None: ...
