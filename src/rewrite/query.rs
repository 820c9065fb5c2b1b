//! End-user parameters of a query string, prefixed in place.
//!
//! Invariant: the value of every `user` and `created_by_end_user_session_id` parameter gets the
//! percent-encoded prefix in front of its raw (still encoded) bytes; every other byte of the
//! query stays as sent. Parameters are split on `&` alone and names are compared *decoded*
//! (`us%65r` and `user` are one name), as the upstream's parser (Werkzeug) reads them.
//!
//! Nothing here can fail: any string splits into parameters, so this module has no error type.

use std::borrow::Cow;

use url::form_urlencoded;

use super::UserPrefix;

/// The parameter names whose values name an end user.
const END_USER_PARAMS: [&str; 2] = ["user", "created_by_end_user_session_id"];

/// `query` (without the `?`) with the prefix put in front of every end-user parameter value;
/// borrowed when it has none. A bare `user` (no `=`) is read upstream as an empty user, so it
/// becomes `user=<prefix>`.
pub fn prefix_user<'q>(query: &'q str, prefix: &UserPrefix) -> Cow<'q, str> {
    if !query.split('&').any(is_end_user) {
        return Cow::Borrowed(query);
    }
    let mut out = String::with_capacity(query.len() + 2 * prefix.query.len());
    for (i, param) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        if !is_end_user(param) {
            out.push_str(param);
            continue;
        }
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        out.push_str(name);
        out.push('=');
        out.push_str(&prefix.query);
        out.push_str(value);
    }
    Cow::Owned(out)
}

/// Whether a `name[=value]` parameter's decoded name is one of [`END_USER_PARAMS`].
fn is_end_user(param: &str) -> bool {
    let name = param.split_once('=').map_or(param, |(name, _)| name);
    if name.is_empty() {
        return false;
    }
    // The name holds no `&` or `=`, so it parses as exactly one pair: the decoded name.
    form_urlencoded::parse(name.as_bytes())
        .next()
        .is_some_and(|(decoded, _)| END_USER_PARAMS.contains(&decoded.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rewrite(query: &str) -> String {
        prefix_user(query, &UserPrefix::new("team-a:").unwrap()).into_owned()
    }

    #[test]
    fn prefixes_end_user_parameters_and_nothing_else() {
        assert_eq!(
            rewrite("page=2&user=abc&keyword=user%3Dx&created_by_end_user_session_id=s%20id"),
            "page=2&user=team-a%3Aabc&keyword=user%3Dx&created_by_end_user_session_id=team-a%3As%20id"
        );
    }

    #[test]
    fn every_repeat_is_prefixed() {
        assert_eq!(rewrite("user=a&user=b"), "user=team-a%3Aa&user=team-a%3Ab");
    }

    #[test]
    fn names_are_compared_decoded() {
        assert_eq!(rewrite("us%65r=x"), "us%65r=team-a%3Ax");
        assert_eq!(
            rewrite("%75ser=x&User=y&user+=z"),
            "%75ser=team-a%3Ax&User=y&user+=z"
        );
    }

    #[test]
    fn a_bare_or_empty_user_becomes_the_prefix_alone() {
        assert_eq!(rewrite("user&limit=5"), "user=team-a%3A&limit=5");
        assert_eq!(rewrite("user="), "user=team-a%3A");
    }

    #[test]
    fn queries_without_end_users_are_borrowed_unchanged() {
        for q in [
            "",
            "&&",
            "page=1&limit=20",
            "=user",
            "username=x",
            "a=b;user=c",
        ] {
            assert!(matches!(
                prefix_user(q, &UserPrefix::new("p:").unwrap()),
                Cow::Borrowed(_)
            ));
        }
    }

    #[test]
    fn semicolons_and_empty_segments_pass_through() {
        assert_eq!(rewrite("&user=a;b=c&&x"), "&user=team-a%3Aa;b=c&&x");
    }

    proptest! {
        /// Decoded, the rewritten query is the original pair list with the prefix added to
        /// end-user values and nothing else changed.
        #[test]
        fn decodes_to_the_prefixed_pairs(
            pairs in proptest::collection::vec(
                (prop_oneof!["user", "created_by_end_user_session_id", "page", "[a-z]{1,5}"], "\\PC{0,8}"),
                0..6,
            ),
            prefix in "[!-~]{1,10}",
        ) {
            let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
            let p = UserPrefix::new(&prefix).unwrap();
            let out = prefix_user(&query, &p);
            let got: Vec<(String, String)> = form_urlencoded::parse(out.as_bytes()).into_owned().collect();
            let want: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| match END_USER_PARAMS.contains(&k.as_str()) {
                    true => (k.clone(), format!("{prefix}{v}")),
                    false => (k.clone(), v.clone()),
                })
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
