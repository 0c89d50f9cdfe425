"""A third-party client unchanged: LangChain's ChatOpenAI against the real server, with
bind_tools and with_structured_output (both of its methods)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

from conftest import ADMIN_KEY, RunningServer

langchain_openai = pytest.importorskip("langchain_openai")

MODEL = "gemma-3-270m"


class Weather(BaseModel):
    """The current weather in a city."""

    city: str = Field(description="The city", max_length=40)
    unit: str = Field(description="celsius or fahrenheit", max_length=12)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int


def chat_model(server: RunningServer, **kwargs) -> "langchain_openai.ChatOpenAI":
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=server.api, api_key=ADMIN_KEY,
                                       temperature=0, max_retries=0, timeout=120, **kwargs)


def test_bind_tools_returns_tool_calls(server: RunningServer) -> None:
    llm = chat_model(server, max_completion_tokens=80).bind_tools(
        [Weather], tool_choice="Weather", parallel_tool_calls=False)
    message = llm.invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    Weather.model_validate(call["args"])
    jsonschema.validate(call["args"], Weather.model_json_schema())


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(server: RunningServer, method: str) -> None:
    llm = chat_model(server, max_completion_tokens=60).with_structured_output(Person,
                                                                              method=method)
    person = llm.invoke("Invent a person with a name and an age.")
    assert isinstance(person, Person)
    assert json.loads(person.model_dump_json())["age"] == person.age
