"""Property tests of the parsing edges: whatever comes in, the only failure is a
typed domain error (which the API maps to a 4xx), never another exception."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from keyservice.domain import policies, rsakeys
from keyservice.domain.errors import DomainError
from keyservice.domain.keys import parse_attributes
from keyservice.domain.names import check_key_name, check_vault_name
from keyservice.tokens import TokenSigner

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
attr_like = st.dictionaries(st.sampled_from(["enabled", "nbf", "exp", "created", "other"]), json_values, max_size=4)


def only_domain_errors(fn, *args):
    try:
        fn(*args)
    except DomainError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.builds(lambda parts: ".".join(parts), st.lists(st.text(max_size=40), max_size=4)))
def test_token_verify(token):
    only_domain_errors(TokenSigner(b"k" * 32).verify, token, 1_800_000_000)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_b64u_and_names(value):
    only_domain_errors(rsakeys.b64u_decode, value)
    only_domain_errors(check_vault_name, value)
    only_domain_errors(check_key_name, value)
    only_domain_errors(policies.parse_permissions, value)
    only_domain_errors(rsakeys.check_size, value)
    only_domain_errors(rsakeys.check_alg, value)


@settings(max_examples=300, deadline=None)
@given(attr_like | json_values, json_values)
def test_attributes(attributes, key_ops):
    only_domain_errors(parse_attributes, attributes, key_ops)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["kty", "n", "e", "d", "p", "q", "dp", "dq", "qi"]),
                       st.text(alphabet="ABCDEFGHIJabcdef0123456789-_", max_size=12), max_size=9))
def test_jwk_import(jwk):
    only_domain_errors(rsakeys.load_jwk, json.loads(json.dumps(dict(jwk, kty="RSA"))))
