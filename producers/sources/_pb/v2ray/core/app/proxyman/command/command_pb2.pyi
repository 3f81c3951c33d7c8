from quotaflow.producers.sources._pb.v2ray.core.common.protocol import user_pb2 as _user_pb2
from quotaflow.producers.sources._pb.v2ray.core.common.serial import typed_message_pb2 as _typed_message_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddUserOperation(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: _user_pb2.User
    def __init__(self, user: _Optional[_Union[_user_pb2.User, _Mapping]] = ...) -> None: ...

class RemoveUserOperation(_message.Message):
    __slots__ = ("email",)
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    email: str
    def __init__(self, email: _Optional[str] = ...) -> None: ...

class AlterInboundRequest(_message.Message):
    __slots__ = ("tag", "operation")
    TAG_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    tag: str
    operation: _typed_message_pb2.TypedMessage
    def __init__(self, tag: _Optional[str] = ..., operation: _Optional[_Union[_typed_message_pb2.TypedMessage, _Mapping]] = ...) -> None: ...

class AlterInboundResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
