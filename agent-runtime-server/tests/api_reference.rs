//! docs/API.md names every operation of the server's route table and every setting of its command
//! line with its flag and default, so the reference in the repository cannot fall behind the code.

use agent_runtime_server::app::ROUTES;
use agent_runtime_server::config::{SETTINGS_HELP, command};

fn reference() -> std::io::Result<String> {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
}

/// The settings table's row of a variable: the line that starts with "| `VAR`".
fn row<'a>(doc: &'a str, var: &str) -> Option<&'a str> {
    let start = format!("| `{var}`");
    doc.lines().find(|l| l.starts_with(&start))
}

#[test]
fn every_operation_of_the_route_table_has_its_own_section() {
    let doc = reference().unwrap();
    let missing: Vec<String> = ROUTES
        .iter()
        .flat_map(|spec| {
            spec.operations
                .iter()
                .map(|op| format!("### {} {}", op.method, spec.path))
        })
        .filter(|heading| !doc.lines().any(|l| l == heading))
        .collect();
    assert_eq!(missing, Vec::<String>::new(), "sections missing from docs/API.md");
}

#[test]
fn every_other_spelling_of_a_route_is_named() {
    let doc = reference().unwrap();
    let missing: Vec<String> = ROUTES
        .iter()
        .filter_map(|spec| spec.alias.map(|alias| (spec, alias)))
        .flat_map(|(spec, alias)| {
            spec.operations
                .iter()
                .map(move |op| format!("{} {alias}", op.method))
        })
        .filter(|named| !doc.contains(named.as_str()))
        .collect();
    assert_eq!(missing, Vec::<String>::new(), "aliases missing from docs/API.md");
}

#[test]
fn every_flag_has_a_settings_row_with_its_variable_and_flag() {
    let doc = reference().unwrap();
    let cmd = command();
    let flags: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            a.get_long()
                .map(|long| (a.get_id().to_string(), long.to_string()))
        })
        .collect();
    assert!(flags.len() >= 33, "the command line lost flags: {flags:?}");
    let missing: Vec<&(String, String)> = flags
        .iter()
        .filter(|(var, long)| row(&doc, var).is_none_or(|r| !r.contains(&format!("| `--{long}` |"))))
        .collect();
    assert_eq!(
        missing,
        Vec::<&(String, String)>::new(),
        "settings rows missing from docs/API.md"
    );
}

#[test]
fn every_settings_row_states_the_default_that_help_states() {
    let doc = reference().unwrap();
    let wrong: Vec<(&str, &str, Option<&str>)> = SETTINGS_HELP
        .iter()
        .map(|(var, _, default)| (*var, *default, row(&doc, var)))
        .filter(|(_, default, r)| {
            r.is_none_or(|r| {
                !r.contains(&format!("| `{default}` |")) && !r.contains(&format!("| {default} |"))
            })
        })
        .collect();
    assert_eq!(wrong, Vec::<(&str, &str, Option<&str>)>::new());
}
