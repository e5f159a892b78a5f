//! The web console (SendGrid's API Keys page) in a real headless Chromium,
//! driven over WebDriver (chromedriver) against the real `keyward serve
//! --http-listen` binary; every change made on screen is then checked
//! where it matters, in `Authorize` decisions over gRPC. Also: the
//! security headers, `--disable-ui`, and the OpenAPI document against the
//! live routes.
//!
//! Chromium and chromedriver must be installed in CI (`.ci/run` installs
//! Debian's `chromium` and `chromium-driver`); elsewhere the browser tests
//! skip with a message. Screenshots of each screen are written to
//! `$KEYWARD_SCREENSHOTS` when set (`docs/screenshots` regenerates the
//! README's: see docs/console.md), else to a temporary directory.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use keyward::pb::v1 as pb;
use keyward::pb::v1::authorizer_client::AuthorizerClient;

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// How long any one screen may take to appear (a loaded CI machine).
const PATIENCE: Duration = Duration::from_secs(20);

/// A `keyward serve` with the REST listener (and so the console).
struct Sidecar {
    child: Child,
    grpc: String,
    http: SocketAddr,
    admin: String,
    dir: tempfile::TempDir,
}

impl Sidecar {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let http = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let http_arg = http.to_string();
        let mut args = vec!["--http-listen", &http_arg];
        args.extend_from_slice(extra);
        let (child, port) = common::spawn_serve(BIN, dir.path(), &args);
        let mut sidecar = Self {
            child,
            grpc: format!("http://127.0.0.1:{port}"),
            http,
            admin: String::new(),
            dir,
        };
        // Read once the child is owned: a failure here still stops it.
        sidecar.admin =
            common::admin_token(&sidecar.dir.path().join(keyward::config::DEFAULT_DATA_DIR));
        sidecar
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Whether `key` may call `method path`, as the gateway asks.
    async fn allows(&self, key: &str, method: &str, path: &str) -> bool {
        let mut client = AuthorizerClient::new(common::connect(&self.grpc).await);
        client
            .authorize(pb::AuthorizeRequest {
                key: key.to_owned(),
                method: method.to_owned(),
                path: path.to_owned(),
                ..pb::AuthorizeRequest::default()
            })
            .await
            .expect("Authorize answers")
            .into_inner()
            .allowed
    }

    /// A REST call as the admin acting for `acme`.
    async fn admin_rest(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let auth = format!("Bearer {}", self.admin);
        common::rest_call(
            self.http,
            method,
            path,
            &[("authorization", &auth), ("on-behalf-of", "acme")],
            body,
        )
        .await
    }

    async fn key_count(&self) -> usize {
        let (status, list) = self.admin_rest("GET", "/v3/api_keys", "").await;
        assert_eq!(status, 200, "{list}");
        list["result"].as_array().expect("result").len()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver on a loopback port, and a headless Chromium session.
struct Browser {
    client: Client,
    driver: Child,
    shots: PathBuf,
    _profile: tempfile::TempDir,
    _shots_dir: Option<tempfile::TempDir>,
}

impl Browser {
    /// `None` (skipped) where chromedriver is not installed, outside CI.
    async fn start() -> Option<Self> {
        let driver_bin = common::tool(
            "KEYWARD_CHROMEDRIVER",
            "chromedriver",
            "apt-get install chromium chromium-driver",
        )?;
        let port = common::free_port();
        // Its own process group, so a failed test can stop Chromium too.
        let driver = Command::new(driver_bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut options = serde_json::json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        });
        if let Ok(binary) = std::env::var("KEYWARD_CHROMIUM") {
            options["binary"] = binary.into();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let url = format!("http://127.0.0.1:{port}");
        let mut client = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let client = client.expect("a Chromium session through chromedriver");
        let (shots, shots_dir) = if let Some(dir) = std::env::var_os("KEYWARD_SCREENSHOTS") {
            (PathBuf::from(dir), None)
        } else {
            let dir = tempfile::tempdir().expect("screenshot dir");
            (dir.path().to_owned(), Some(dir))
        };
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Some(Self {
            client,
            driver,
            shots,
            _profile: profile,
            _shots_dir: shots_dir,
        })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigates");
    }

    async fn wait_for(&self, xpath: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::XPath(xpath))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                // What the screen held instead, for the CI log.
                let shown = self
                    .client
                    .execute("return document.body.innerText;", vec![])
                    .await
                    .unwrap_or_default();
                self.screenshot("failure").await;
                panic!(
                    "no {xpath} on screen ({e}); it shows:\n{}",
                    shown.as_str().unwrap_or_default()
                );
            }
        }
    }

    /// Waits until `xpath` matches nothing.
    async fn wait_gone(&self, xpath: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !self
            .client
            .find_all(Locator::XPath(xpath))
            .await
            .expect("query")
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{xpath} stays on screen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The control whose accessible name (its `<label>`) is `label`,
    /// optionally inside the fieldset whose legend is `legend`.
    async fn labelled(&self, legend: Option<&str>, label: &str) -> Element {
        let scope = legend.map_or_else(String::new, |legend| {
            format!("//fieldset[legend[normalize-space()={}]]", quote(legend))
        });
        let label = quote(label);
        let xpath = format!(
            "({scope}//label[normalize-space()={label}]//input | {scope}//input[@id=//label[normalize-space()={label}]/@for] | {scope}//textarea[@id=//label[normalize-space()={label}]/@for])[1]"
        );
        self.wait_for(&xpath).await
    }

    /// Clicks the radio input labelled `label` in the fieldset `legend`.
    async fn choose(&self, legend: &str, label: &str) {
        self.settled().await;
        self.labelled(Some(legend), label)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("{legend} / {label}: {e}"));
    }

    async fn button(&self, name: &str) -> Element {
        self.wait_for(&format!(
            "//button[normalize-space()={} and not(ancestor::*[@hidden])]",
            quote(name)
        ))
        .await
    }

    async fn click(&self, name: &str) {
        self.settled().await;
        self.button(name).await.click().await.expect("click");
    }

    async fn fill(&self, label: &str, text: &str) {
        self.settled().await;
        let input = self.labelled(None, label).await;
        input.clear().await.expect("clear");
        input.send_keys(text).await.expect("type");
    }

    async fn heading(&self, text: &str) {
        self.wait_for(&format!(
            "//h1[starts-with(normalize-space(), {})]",
            quote(text)
        ))
        .await;
    }

    /// Waits until the screen is drawn (`<main aria-busy>` is cleared once
    /// a screen's data has arrived): a control found earlier could be
    /// replaced under the click.
    async fn settled(&self) {
        self.wait_for("//main[not(@aria-busy)]").await;
    }

    /// Opens the Actions menu of the row named `key` and picks `item`.
    async fn action(&self, key: &str, item: &str) {
        self.settled().await;
        let row = format!("//tr[td[1][normalize-space()={}]]", quote(key));
        self.wait_for(&format!("{row}//button[normalize-space()='Actions']"))
            .await
            .click()
            .await
            .expect("open the menu");
        self.wait_for(&format!(
            "{row}//*[@role='menu' and not(@hidden)]//button[normalize-space()={}]",
            quote(item)
        ))
        .await
        .click()
        .await
        .expect("pick the item");
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("save screenshot");
    }

    /// [`Self::screenshot`] of the top of the page.
    async fn screenshot_top(&self, name: &str) {
        self.script("window.scrollTo(0, 0); return null;").await;
        self.screenshot(name).await;
    }

    /// Types into whatever has the focus, as a keyboard does.
    async fn press(&self, keys: &str) {
        self.client
            .active_element()
            .await
            .expect("something has the focus")
            .send_keys(keys)
            .await
            .expect("keys");
    }

    /// The focused element's text.
    async fn focused(&self) -> String {
        self.client
            .active_element()
            .await
            .expect("focus")
            .text()
            .await
            .expect("text")
    }

    async fn script(&self, js: &str) -> serde_json::Value {
        self.client.execute(js, vec![]).await.expect("script runs")
    }

    async fn sign_in(&self, credential: &str, account: &str) {
        self.fill("API key or admin token", credential).await;
        self.fill("Account", account).await;
        self.click("Sign in").await;
        self.heading("API Keys").await;
    }

    /// Ends the session; [`Drop`] stops chromedriver and Chromium.
    async fn stop(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share its process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

/// An XPath string literal for `text` (which holds no `"` here).
fn quote(text: &str) -> String {
    assert!(!text.contains('"'), "quote: {text}");
    format!("\"{text}\"")
}

/// The secret the page shows once.
async fn shown_secret(browser: &Browser) -> String {
    let secret = browser
        .wait_for("//input[@aria-label='API key secret']")
        .await
        .prop("value")
        .await
        .expect("value")
        .expect("a secret");
    assert_eq!(secret.len(), 69, "a SendGrid-shaped secret");
    secret
}

/// The key named `name` in `acme`, as REST reads it.
async fn detail(sidecar: &Sidecar, name: &str) -> serde_json::Value {
    let (_, list) = sidecar.admin_rest("GET", "/v3/api_keys", "").await;
    let id = list["result"]
        .as_array()
        .expect("result")
        .iter()
        .find(|key| key["name"] == name)
        .unwrap_or_else(|| panic!("no key {name}"))["api_key_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, read) = sidecar
        .admin_rest("GET", &format!("/v3/api_keys/{id}"), "")
        .await;
    assert_eq!(status, 200, "{read}");
    read["result"][0].clone()
}

/// What the page's storage holds: nothing, ever.
async fn assert_nothing_stored(browser: &Browser, secrets: &[&str]) {
    let stored = browser
        .script("return [JSON.stringify(localStorage), JSON.stringify(sessionStorage), document.cookie];")
        .await;
    assert_eq!(
        stored,
        serde_json::json!(["{}", "{}", ""]),
        "browser storage"
    );
    let url = browser.client.current_url().await.expect("url").to_string();
    for secret in secrets {
        assert!(!url.contains(secret), "a credential in the URL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_manages_a_key_through_every_screen() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let sidecar = Sidecar::start(&[]);
    browser.goto(&sidecar.url("/")).await;
    browser.wait_for("//h1[normalize-space()='Sign in']").await;
    browser.screenshot("sign-in").await;

    // The admin token without an account: the page says where the problem is.
    browser.fill("API key or admin token", &sidecar.admin).await;
    browser.click("Sign in").await;
    browser
        .wait_for("//p[@class='error' and not(@hidden) and contains(., 'Account: required')]")
        .await;
    browser.sign_in(&sidecar.admin, "acme").await;

    let secret = create_a_restricted_key(&browser, &sidecar).await;
    edit_its_levels(&browser, &sidecar, &secret).await;
    let rotated = its_lifecycle(&browser, &sidecar, &secret).await;
    markup_stays_text(&browser, &sidecar).await;

    // Delete, confirmed: the key is refused from then on.
    browser.action("mail sender", "Delete").await;
    browser
        .wait_for("//dialog//p[contains(translate(., 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'), 'any subsequent api calls using this key will be rejected')]")
        .await;
    browser.screenshot("delete").await;
    browser.click("Confirm").await;
    browser
        .wait_gone("//tr[td[1][normalize-space()='mail sender']]")
        .await;
    assert!(!sidecar.allows(&rotated, "GET", "/v3/alerts").await);
    assert!(!sidecar.allows(&secret, "GET", "/v3/alerts").await);

    browser.click("Sign out").await;
    browser.wait_for("//h1[normalize-space()='Sign in']").await;
    assert_nothing_stored(&browser, &[&secret, &rotated, &sidecar.admin]).await;
    browser.stop().await;
}

/// A key named with markup is shown as text everywhere it appears (the
/// list, its menu, a dialog) and makes no element.
async fn markup_stays_text(browser: &Browser, sidecar: &Sidecar) {
    let markup = "<img src=x onerror=document.title='owned'>";
    let (status, _) = sidecar
        .admin_rest(
            "POST",
            "/v3/api_keys",
            &serde_json::json!({ "name": markup, "scopes": ["alerts.read"] }).to_string(),
        )
        .await;
    assert_eq!(status, 201);
    browser.click("Create API Key").await;
    browser.click("Cancel").await;
    browser.heading("API Keys").await;
    browser.action(markup, "Delete").await;
    browser.wait_for("//dialog[@open]").await;
    let rendered = browser
        .script(&format!(
            "const name = {};
             const cells = [...document.querySelectorAll('td')].filter(td => td.textContent === name);
             const shown = [...document.querySelectorAll('dialog strong')].filter(s => s.textContent === name);
             const labelled = document.querySelectorAll('[aria-label]').length;
             return [cells.length, shown.length, document.querySelectorAll('img').length, labelled > 0, document.title];",
            serde_json::to_string(markup).expect("json")
        ))
        .await;
    assert_eq!(
        rendered,
        serde_json::json!([1, 1, 0, true, "API Keys · keyward"]),
        "the name is text in the list and the dialog, and no element was made of it"
    );
    browser.click("Cancel").await;
    browser.wait_gone("//dialog").await;
}

/// Create: Restricted, Mail Send = Full, Alerts = Read; the secret shown once.
async fn create_a_restricted_key(browser: &Browser, sidecar: &Sidecar) -> String {
    browser.click("Create API Key").await;
    browser.heading("Create API Key").await;
    browser.fill("API Key Name", "mail sender").await;
    browser
        .choose("API Key Permissions", "Restricted Access")
        .await;
    browser.choose("Mail Send", "Full Access").await;
    browser.choose("Alerts", "Read Access").await;
    browser.screenshot_top("create").await;
    browser.click("Create & View").await;
    let secret = shown_secret(browser).await;
    browser.button("Copy").await;
    browser
        .wait_for("//*[contains(., 'will not be shown again')]")
        .await;
    browser.screenshot("created").await;

    // Shown once: after navigating away and back, it is gone.
    browser.click("Done").await;
    browser.heading("API Keys").await;
    browser.client.back().await.expect("back");
    browser
        .wait_for("//p[contains(., 'shown once and is gone')]")
        .await;
    let page = browser.client.source().await.expect("source");
    assert!(!page.contains(&secret), "the secret is still in the page");
    assert_nothing_stored(browser, &[&secret, &sidecar.admin]).await;

    assert!(sidecar.allows(&secret, "POST", "/v3/mail/send").await);
    assert!(sidecar.allows(&secret, "GET", "/v3/alerts").await);
    assert!(!sidecar.allows(&secret, "POST", "/v3/alerts").await);
    assert!(!sidecar.allows(&secret, "GET", "/v3/stats").await);
    assert!(!sidecar.allows(&secret, "GET", "/v3/api_keys").await);

    secret
}

/// Edit the levels: the next decision changes.
async fn edit_its_levels(browser: &Browser, sidecar: &Sidecar, secret: &str) {
    // Two more keys, for a list with every kind and state.
    for body in [
        serde_json::json!({ "name": "production", "expires_at": 4_102_444_800_i64 }),
        serde_json::json!({ "name": "invoices", "scopes": ["billing.read"] }),
    ] {
        let (status, reply) = sidecar
            .admin_rest("POST", "/v3/api_keys", &body.to_string())
            .await;
        assert_eq!(status, 201, "{reply}");
    }
    browser.client.refresh().await.expect("reload");
    // A fresh load signs out: the credential was in the page's memory only.
    browser.wait_for("//h1[normalize-space()='Sign in']").await;
    browser.sign_in(&sidecar.admin, "acme").await;
    browser
        .wait_for("//tr[td[1]='invoices']/td[normalize-space()='Billing Access']")
        .await;
    browser
        .wait_for("//tr[td[1]='production']/td[normalize-space()='Full Access']")
        .await;
    browser.screenshot("list").await;
    browser.settled().await;
    browser
        .wait_for("//tr[td[1]='mail sender']//button[normalize-space()='Actions']")
        .await
        .click()
        .await
        .expect("open the menu");
    browser
        .wait_for("//tr[td[1]='mail sender']//*[@role='menu' and not(@hidden)]")
        .await;
    browser.screenshot("actions").await;
    browser.press(&Key::Escape.to_string()).await;
    browser.action("mail sender", "Edit").await;
    browser.heading("Edit API Key").await;
    browser.choose("Alerts", "Full Access").await;
    browser.choose("Mail Send", "No Access").await;
    browser.screenshot_top("edit").await;
    browser
        .script("document.querySelector('main h2').scrollIntoView(); return null;")
        .await;
    browser.screenshot("edit-lifecycle").await;
    browser.click("Save").await;
    browser.heading("API Keys").await;
    assert!(sidecar.allows(secret, "POST", "/v3/alerts").await);
    assert!(!sidecar.allows(secret, "POST", "/v3/mail/send").await);
}

/// Disable, enable, a refused setting, rotate; returns the new secret.
async fn its_lifecycle(browser: &Browser, sidecar: &Sidecar, secret: &str) -> String {
    // Disable, then enable.
    browser.action("mail sender", "Disable").await;
    browser
        .wait_for("//tr[td[1]='mail sender']//span[normalize-space()='disabled']")
        .await;
    assert!(!sidecar.allows(secret, "GET", "/v3/alerts").await);
    browser.action("mail sender", "Enable").await;
    browser
        .wait_for("//tr[td[1]='mail sender']//span[normalize-space()='enabled']")
        .await;
    assert!(sidecar.allows(secret, "GET", "/v3/alerts").await);

    // A lifecycle setting the server refuses: its message by its field.
    browser.action("mail sender", "Rate limit").await;
    browser.fill("Requests", "10").await;
    browser.fill("Period (ms)", "0").await;
    browser.click("Save rate limit").await;
    browser
        .wait_for("//p[@class='error' and not(@hidden) and contains(., 'rate_limit.period_ms: must be 1ms to 24h')]/preceding-sibling::input[@aria-invalid='true']")
        .await;
    browser.screenshot("field-error").await;
    browser.click("Cancel").await;

    // Rotate with an overlap: both secrets work, the new one shown once.
    browser.action("mail sender", "Rotate").await;
    browser.fill("Overlap (seconds)", "3600").await;
    browser.click("Rotate").await;
    let rotated = shown_secret(browser).await;
    assert_ne!(rotated, secret);
    browser.screenshot("rotate").await;
    browser.click("Close").await;
    browser.wait_gone("//dialog").await;
    let page = browser.client.source().await.expect("source");
    assert!(
        !page.contains(&rotated),
        "the rotated secret stays in the page"
    );
    assert!(sidecar.allows(secret, "GET", "/v3/alerts").await);
    assert!(sidecar.allows(&rotated, "GET", "/v3/alerts").await);

    // Expiry: entering a time unticks "Never expires"; the key gets it.
    browser.action("mail sender", "Expiry").await;
    let at = browser.labelled(None, "Expires at (UTC)").await;
    browser
        .client
        .execute(
            "arguments[0].value = '2099-01-01T00:00:00'; arguments[0].dispatchEvent(new Event('input'));",
            vec![serde_json::to_value(&at).expect("element")],
        )
        .await
        .expect("a time entered");
    browser.screenshot("expiry").await;
    browser.click("Save expiry").await;
    browser.wait_gone("//dialog").await;
    assert_eq!(
        detail(sidecar, "mail sender").await["expires_at"],
        4_070_908_800_i64
    );

    // Allowlist: a range the caller is not in refuses it; empty allows again.
    browser.action("mail sender", "Allowlist").await;
    browser.fill("Allowed addresses", "10.0.0.0/8").await;
    browser.click("Save allowlist").await;
    browser.wait_gone("//dialog").await;
    assert!(!sidecar.allows(&rotated, "GET", "/v3/alerts").await);
    browser.action("mail sender", "Allowlist").await;
    browser.fill("Allowed addresses", "").await;
    browser.click("Save allowlist").await;
    browser.wait_gone("//dialog").await;
    assert!(sidecar.allows(&rotated, "GET", "/v3/alerts").await);

    its_credits(browser, sidecar, &rotated).await;

    rotated
}

/// Credits: two uses, refilled daily; the third is refused; unlimited
/// again once "Unlimited" is ticked.
async fn its_credits(browser: &Browser, sidecar: &Sidecar, secret: &str) {
    browser.action("mail sender", "Credits").await;
    browser.fill("Remaining", "2").await;
    browser.fill("Refill to", "5").await;
    browser.screenshot("credits").await;
    browser.click("Save credits").await;
    browser.wait_gone("//dialog").await;
    let credits = &detail(sidecar, "mail sender").await["credits"];
    assert_eq!(credits["refill"]["amount"], 5, "{credits}");
    assert_eq!(credits["refill"]["period_seconds"], 86_400, "{credits}");
    assert!(sidecar.allows(secret, "GET", "/v3/alerts").await);
    assert!(sidecar.allows(secret, "GET", "/v3/alerts").await);
    assert!(!sidecar.allows(secret, "GET", "/v3/alerts").await);
    browser.action("mail sender", "Credits").await;
    browser
        .labelled(None, "Unlimited (no credits)")
        .await
        .click()
        .await
        .expect("ticked");
    browser.click("Save credits").await;
    browser.wait_gone("//dialog").await;
    assert!(detail(sidecar, "mail sender").await["credits"].is_null());
    assert!(sidecar.allows(secret, "GET", "/v3/alerts").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sees_only_what_it_may_grant_and_a_forged_request_is_refused() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let sidecar = Sidecar::start(&[]);
    let scopes = [
        "api_keys.create",
        "api_keys.read",
        "api_keys.update",
        "api_keys.delete",
        "alerts.read",
    ];
    let (status, created) = sidecar
        .admin_rest(
            "POST",
            "/v3/api_keys",
            &serde_json::json!({ "name": "key admin", "scopes": scopes }).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let key = created["api_key"].as_str().expect("secret").to_owned();

    browser.goto(&sidecar.url("/")).await;
    browser.sign_in(&key, "").await;
    browser.click("Create API Key").await;
    browser.heading("Create API Key").await;
    browser
        .choose("API Key Permissions", "Restricted Access")
        .await;

    for (legend, label, enabled) in [
        ("Mail Send", "No Access", true),
        ("Mail Send", "Full Access", false),
        ("Alerts", "Read Access", true),
        ("Alerts", "Full Access", false),
        ("API Key Permissions", "Full Access", false),
    ] {
        let control = browser.labelled(Some(legend), label).await;
        assert_eq!(
            control.is_enabled().await.expect("enabled"),
            enabled,
            "{legend} / {label}"
        );
    }
    // Each disabled level says why.
    browser
        .wait_for("//fieldset[legend='Mail Send']//span[@class='why' and contains(., 'your credential lacks mail.')]")
        .await;
    browser.screenshot("least-privilege").await;

    // Forge what the page would not send: enable Mail Send's Full Access.
    browser.fill("API Key Name", "escalation").await;
    let forged = browser.labelled(Some("Mail Send"), "Full Access").await;
    browser
        .client
        .execute(
            "arguments[0].disabled = false; arguments[0].click();",
            vec![serde_json::to_value(&forged).expect("element")],
        )
        .await
        .expect("forged");
    let before = sidecar.key_count().await;
    browser.click("Create & View").await;
    browser
        .wait_for("//fieldset[legend='API Key Permissions']/p[@class='error' and not(@hidden) and contains(., 'cannot grant scopes the caller does not hold') and contains(., 'mail.send')]")
        .await;
    browser.screenshot("forged-refused").await;
    assert_eq!(sidecar.key_count().await, before, "nothing was created");
    assert_nothing_stored(&browser, &[&key]).await;
    browser.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_from_the_keyboard_alone() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let sidecar = Sidecar::start(&[]);
    let (status, created) = sidecar
        .admin_rest(
            "POST",
            "/v3/api_keys",
            &serde_json::json!({ "name": "ops", "scopes": ["alerts.read"] }).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let ops = created["api_key"].as_str().expect("secret").to_owned();
    browser.goto(&sidecar.url("/")).await;
    browser.wait_for("//h1[normalize-space()='Sign in']").await;

    // Sign in: the credential field has the focus; Tab, type, Enter.
    browser.press(&sidecar.admin).await;
    browser.press(&(Key::Tab + "acme")).await;
    browser.press(&Key::Enter.to_string()).await;
    browser.heading("API Keys").await;

    // Tab to the row's Actions, open it, arrow to Disable, Enter.
    browser.press(&(Key::Tab + &Key::Tab.to_string())).await;
    assert_eq!(browser.focused().await, "Actions");
    browser.press(&Key::Enter.to_string()).await;
    assert_eq!(browser.focused().await, "Edit", "the menu's first item");
    browser
        .press(&(Key::Down + &(Key::Down + &Key::Enter.to_string())))
        .await;
    browser
        .wait_for("//tr[td[1]='ops']//span[normalize-space()='disabled']")
        .await;
    assert!(!sidecar.allows(&ops, "GET", "/v3/alerts").await);

    // Escape closes a menu and gives the focus back to its button.
    browser.press(&(Key::Tab + &Key::Tab.to_string())).await;
    browser.press(&Key::Enter.to_string()).await;
    browser.press(&Key::Escape.to_string()).await;
    assert_eq!(browser.focused().await, "Actions");

    // Create: Enter on the button, type the name, Tab to the Alerts levels,
    // arrow to Read Access, back to the name, Enter submits.
    browser
        .press(&(Key::Shift + &(Key::Tab + &Key::Null.to_string())))
        .await;
    assert_eq!(browser.focused().await, "Create API Key");
    browser.press(&Key::Enter.to_string()).await;
    browser.heading("Create API Key").await;
    browser.press("from the keyboard").await;
    browser.press(&(Key::Tab + &Key::Tab.to_string())).await;
    browser.press(&Key::Right.to_string()).await;
    assert!(
        browser
            .labelled(Some("Alerts"), "Read Access")
            .await
            .is_selected()
            .await
            .expect("selected"),
        "the arrow key chose Alerts: Read Access"
    );
    let back = Key::Shift + &(Key::Tab + &(Key::Tab + &Key::Null.to_string()));
    browser.press(&back).await;
    browser.press(&Key::Enter.to_string()).await;
    let secret = shown_secret(&browser).await;
    assert!(sidecar.allows(&secret, "GET", "/v3/alerts").await);
    assert!(!sidecar.allows(&secret, "POST", "/v3/alerts").await);
    browser.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_through_an_account_with_many_keys() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let sidecar = Sidecar::start(&[]);
    for n in 0..23 {
        let body = serde_json::json!({ "name": format!("key {n:02}"), "scopes": ["alerts.read"] });
        let (status, reply) = sidecar
            .admin_rest("POST", "/v3/api_keys", &body.to_string())
            .await;
        assert_eq!(status, 201, "{reply}");
    }
    browser.goto(&sidecar.url("/")).await;
    browser.sign_in(&sidecar.admin, "acme").await;
    let rows = "return [...document.querySelectorAll('tbody tr td:first-child')].map(td => td.textContent);";
    let names = |from: usize, to: usize| -> serde_json::Value {
        (from..to).map(|n| format!("key {n:02}")).collect()
    };
    browser.button("Next page").await;
    assert_eq!(browser.script(rows).await, names(0, 20));
    assert!(
        browser
            .client
            .find_all(Locator::XPath(
                "//button[normalize-space()='Previous page']"
            ))
            .await
            .expect("query")
            .is_empty()
    );
    browser.click("Next page").await;
    browser.wait_for("//caption[contains(., 'page 2')]").await;
    assert_eq!(browser.script(rows).await, names(20, 23));
    assert!(
        browser
            .client
            .find_all(Locator::XPath("//button[normalize-space()='Next page']"))
            .await
            .expect("query")
            .is_empty(),
        "the last page offers no next"
    );
    browser.click("Previous page").await;
    browser.wait_gone("//caption[contains(., 'page 2')]").await;
    assert_eq!(browser.script(rows).await, names(0, 20));

    // A scope in two categories (Clients' stats are Stats' too) moves in
    // both: Stats = Read, then Clients = No Access grants no clients scope.
    browser.click("Create API Key").await;
    browser.fill("API Key Name", "stats only").await;
    browser.choose("Stats", "Read Access").await;
    browser.choose("Clients", "No Access").await;
    browser
        .wait_for("//fieldset[legend='Stats']//span[contains(., 'Custom') and not(@hidden)]")
        .await;
    browser.click("Create & View").await;
    shown_secret(&browser).await;
    let scopes = detail(&sidecar, "stats only").await["scopes"].clone();
    let scopes: Vec<&str> = scopes
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(scopes.contains(&"stats.read"), "{scopes:?}");
    assert!(
        !scopes.iter().any(|s| s.starts_with("clients.")),
        "Clients shows No Access, so no clients scope: {scopes:?}"
    );
    browser.stop().await;
}

/// The headers of one response, lowercased names.
async fn response_head(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = common::http_exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        b"",
    )
    .await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, response.to_ascii_lowercase())
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_the_ui_can_be_turned_off() {
    let sidecar = Sidecar::start(&[]);
    for (path, status) in [
        ("/", 200),
        ("/console/app.js", 200),
        ("/console/app.css", 200),
        ("/console/favicon.svg", 200),
        ("/openapi.json", 200),
        ("/v3/api_keys", 401),
        ("/nowhere", 404),
    ] {
        let (got, head) = response_head(sidecar.http, path).await;
        assert_eq!(got, status, "{path}");
        let csp = head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .unwrap_or_else(|| panic!("{path}: no CSP"));
        for directive in [
            "default-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: CSP lacks {directive}");
        }
        for loose in [
            "unsafe-inline",
            "unsafe-eval",
            "http:",
            "https:",
            "data:",
            "*",
        ] {
            assert!(!csp.contains(loose), "{path}: CSP allows {loose}");
        }
        for header in [
            "x-content-type-options: nosniff",
            "referrer-policy: no-referrer",
            "cache-control: no-store",
            "x-frame-options: deny",
        ] {
            assert!(head.contains(header), "{path}: no {header}");
        }
    }
    // The page loads nothing from elsewhere and has no inline code.
    let (_, page) = response_head(sidecar.http, "/").await;
    let script_tags = page.matches("<script").count();
    assert_eq!(script_tags, page.matches("<script src=\"/console/").count());
    for inline in [
        " style=",
        " onload=",
        " onclick=",
        "javascript:",
        "//cdn",
        "http://",
        "https://",
    ] {
        assert!(!page.contains(inline), "the page holds {inline}");
    }

    let quiet = Sidecar::start(&["--disable-ui"]);
    assert_eq!(response_head(quiet.http, "/").await.0, 404);
    assert_eq!(response_head(quiet.http, "/console/app.js").await.0, 404);
    assert_eq!(response_head(quiet.http, "/v3/scopes").await.0, 401);
    assert_eq!(response_head(quiet.http, "/openapi.json").await.0, 200);
}

/// A made-up key id of the right shape.
const UNKNOWN_ID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_live_routes() {
    let sidecar = Sidecar::start(&[]);
    let (status, document) = common::rest_call(sidecar.http, "GET", "/openapi.json", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"]
            .as_str()
            .expect("version")
            .starts_with("3.")
    );
    let paths = document["paths"].as_object().expect("paths");
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(operation) = item.get(method) {
                operations.push((method.to_ascii_uppercase(), path.clone()));
                for code in ["401", "503"] {
                    assert!(
                        operation["responses"].get(code).is_some(),
                        "{method} {path} does not document {code}"
                    );
                }
            }
        }
    }
    // SendGrid's routes and keyward's additions, each described.
    let expected = [
        ("GET", "/v3/api_keys"),
        ("POST", "/v3/api_keys"),
        ("GET", "/v3/api_keys/{api_key_id}"),
        ("PUT", "/v3/api_keys/{api_key_id}"),
        ("PATCH", "/v3/api_keys/{api_key_id}"),
        ("DELETE", "/v3/api_keys/{api_key_id}"),
        ("POST", "/v3/api_keys/{api_key_id}/disable"),
        ("POST", "/v3/api_keys/{api_key_id}/enable"),
        ("POST", "/v3/api_keys/{api_key_id}/rotate"),
        ("PUT", "/v3/api_keys/{api_key_id}/expiry"),
        ("PUT", "/v3/api_keys/{api_key_id}/allowlist"),
        ("PUT", "/v3/api_keys/{api_key_id}/rate_limit"),
        ("PUT", "/v3/api_keys/{api_key_id}/credits"),
        ("GET", "/v3/api_keys/{api_key_id}/usage"),
        ("GET", "/v3/scopes"),
        ("GET", "/v3/scopes/catalog"),
    ];
    let mut documented: Vec<(String, String)> = operations.clone();
    documented.sort();
    let mut wanted: Vec<(String, String)> = expected
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    wanted.sort();
    assert_eq!(documented, wanted);

    // Every documented operation is a live, authenticated route: without a
    // credential 401; with the admin's, never the router's "no such
    // endpoint" or 405.
    let auth = format!("Bearer {}", sidecar.admin);
    for (method, path) in &operations {
        let path = path.replace("{api_key_id}", UNKNOWN_ID);
        let (status, _) = common::rest_call(sidecar.http, method, &path, &[], "{}").await;
        assert_eq!(status, 401, "{method} {path} without a credential");
        let (status, reply) = common::rest_call(
            sidecar.http,
            method,
            &path,
            &[("authorization", &auth), ("on-behalf-of", "acme")],
            "{}",
        )
        .await;
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !reply.to_string().contains("no such endpoint"),
            "{method} {path} is documented but not routed: {reply}"
        );
    }
    // And what is not documented is not routed.
    for (method, path) in [
        ("GET", "/v3/api_keys/x/y"),
        ("POST", "/v3/scopes"),
        ("GET", "/v3/keys"),
    ] {
        let (status, _) =
            common::rest_call(sidecar.http, method, path, &[("authorization", &auth)], "").await;
        assert!(status == 404 || status == 405, "{method} {path}: {status}");
    }
}

/// A key GitHub's secret scanning found in public: the list says it was
/// disabled because it leaked, and where; its edit screen says so too.
#[tokio::test]
async fn a_key_disabled_for_a_leak_says_where_it_was_found() {
    use common::github::{GITHUB_URL, Signer256, post_signed, report, write_document};
    let Some(browser) = Browser::start().await else {
        return;
    };
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let github = Signer256::new("github-key-1");
    let keys_file = keys_dir.path().join("github-keys.json");
    write_document(&keys_file, &[&github]);
    let keys_arg = keys_file.display().to_string();
    let sidecar = Sidecar::start(&["--secret-scanning-keys", &keys_arg]);
    let (status, created) = sidecar
        .admin_rest(
            "POST",
            "/v3/api_keys",
            r#"{"name": "pasted in public", "scopes": ["mail.send"]}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["api_key"].as_str().expect("secret");
    let (status, feedback) = post_signed(sidecar.http, &github, &report(&[secret])).await;
    assert_eq!(status, 200, "{feedback}");
    assert!(!sidecar.allows(secret, "POST", "/v3/mail/send").await);

    browser.goto(&sidecar.url("/")).await;
    browser.sign_in(&sidecar.admin, "acme").await;
    let row = "//tr[td[1][normalize-space()='pasted in public']]";
    browser
        .wait_for(&format!(
            "{row}//span[contains(@class, 'badge') and normalize-space()='disabled: leaked']"
        ))
        .await;
    browser
        .wait_for(&format!(
            "{row}//*[contains(., 'Disabled because its secret was found at {GITHUB_URL}')]"
        ))
        .await;
    browser.action("pasted in public", "Edit").await;
    browser
        .wait_for(&format!(
            "//p[@role='alert' and contains(., 'found at {GITHUB_URL}')]"
        ))
        .await;
    browser.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edit_screen_charts_a_keys_usage_from_the_usage_store() {
    let Some(redis) = common::redis::Redis::start() else {
        return;
    };
    let Some(browser) = Browser::start().await else {
        return;
    };
    let flags = redis.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sidecar = Sidecar::start(&flags);
    let (status, created) = sidecar
        .admin_rest(
            "POST",
            "/v3/api_keys",
            r#"{"name": "charted", "scopes": ["mail.send"]}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let (id, secret) = (
        created["api_key_id"].as_str().expect("id").to_owned(),
        created["api_key"].as_str().expect("secret").to_owned(),
    );
    for _ in 0..12 {
        assert!(sidecar.allows(&secret, "POST", "/v3/mail/send").await);
    }
    for _ in 0..5 {
        assert!(!sidecar.allows(&secret, "GET", "/v3/alerts").await);
    }
    // The counts reach the store within a flush (a second).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (_, usage) = sidecar
            .admin_rest("GET", &format!("/v3/api_keys/{id}/usage"), "")
            .await;
        if usage["totals"]["allowed"] == 12 && usage["totals"]["denied"] == 5 {
            assert_eq!(usage["totals"]["denied_by_reason"]["insufficient_scope"], 5);
            assert_eq!(usage["series"].as_array().expect("series").len(), 60);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage never summed: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    browser.goto(&sidecar.url("/")).await;
    browser.sign_in(&sidecar.admin, "acme").await;
    browser
        .goto(&sidecar.url(&format!("/#/keys/{id}/edit")))
        .await;
    browser
        .wait_for(
            "//p[contains(., '12 allowed, 5 denied (5 insufficient scope), over every sidecar.')]",
        )
        .await;
    let chart = browser
        .wait_for("//*[local-name()='svg' and @role='img' and contains(@aria-label, 'Requests by minute')]")
        .await;
    let bars = chart
        .find_all(Locator::Css("rect.allowed"))
        .await
        .expect("bars");
    assert_eq!(bars.len(), 60, "one bar per minute of the hour");
    browser
        .script("document.querySelector('.usage-chart').scrollIntoView({block: 'center'}); return null;")
        .await;
    browser.screenshot("usage").await;
    browser.stop().await;
}
