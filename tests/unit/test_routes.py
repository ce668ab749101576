"""The route table and the task registry cover the contract: every call has one home."""

from __future__ import annotations

from sidecar.domain import ClassifyRequest, GenerateRequest
from sidecar.grpc import routes
from sidecar.grpc.servicers import InferenceServicer
from sidecar.models.manifest import Task
from sidecar.tasks import registry
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc


def test_every_unary_rpc_and_stream_item_has_a_route() -> None:
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    unary = {m.name for m in service.methods if not m.client_streaming and not m.server_streaming}
    assert {route.rpc for route in routes.UNARY} == unary
    items = {f.name for f in pb.StreamRequest.DESCRIPTOR.oneofs_by_name["request"].fields}
    assert set(routes.BY_ITEM) == items - {"generate", "cancel"}
    for route in routes.UNARY:
        method = service.methods_by_name[route.rpc]
        assert "model" in method.input_type.fields_by_name
        assert pb.StreamRequest.DESCRIPTOR.fields_by_name[route.item].message_type == (
            method.input_type
        )
        # The servicer's method comes from the route, so a new row needs no servicer edit.
        served = getattr(InferenceServicer, route.rpc)
        assert served is not getattr(inference_pb2_grpc.InferenceServicer, route.rpc)
        assert served.__qualname__ == f"InferenceServicer.{route.rpc}"


def test_every_model_task_is_served_by_one_task_module() -> None:
    served = {handler.task for handler in registry.ENCODER_TASKS}
    assert served | set(registry.GENERATE.tasks) == set(Task)
    assert len(served) == len(registry.ENCODER_TASKS)


def test_each_request_kind_names_its_call_and_the_tasks_that_answer_it() -> None:
    for handler in registry.ENCODER_TASKS:
        kind = registry.kind_for(handler.request_type)
        assert kind.rpc == handler.rpc
        assert handler.task in kind.tasks
    assert registry.kind_for(ClassifyRequest).tasks == (Task.CLASSIFY, Task.ZERO_SHOT)
    assert registry.kind_of(GenerateRequest(model="")).tasks == (Task.GENERATE, Task.SEQ2SEQ)
