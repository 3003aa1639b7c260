// The web page of `latent serve` in headless Chromium, driven over the DevTools protocol:
// the lists fill in, a prompt is typed, Generate is clicked, the progress and the preview
// show, and the picture arrives with its parameters. Run by tests/clients/run_page.sh with
// SERVER_URL DEVTOOLS_PORT (Node 20 needs --experimental-websocket).
const [server, devtools] = process.argv.slice(2);

const tab = await (await fetch(`http://127.0.0.1:${devtools}/json/new?${server}/`, {method: "PUT"})).json();
const ws = new WebSocket(tab.webSocketDebuggerUrl);
await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
let next = 0;
const pending = new Map();
ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  if (message.id && pending.has(message.id)) {
    pending.get(message.id)(message);
    pending.delete(message.id);
  }
};
const send = (method, params = {}) => new Promise((resolve) => {
  const id = ++next;
  pending.set(id, resolve);
  ws.send(JSON.stringify({id, method, params}));
});
async function evaluate(expression) {
  const answer = await send("Runtime.evaluate", {expression, awaitPromise: true, returnByValue: true});
  if (answer.error || answer.result.exceptionDetails) {
    throw new Error(`${expression}: ${JSON.stringify(answer.error || answer.result.exceptionDetails)}`);
  }
  return answer.result.result.value;
}
async function waitFor(what, expression, seconds) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    if (await evaluate(expression)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  const status = await evaluate("document.getElementById('status').textContent + ' | ' + document.getElementById('error').textContent");
  throw new Error(`timed out waiting for ${what} (page says: ${status})`);
}
function check(condition, message) {
  if (!condition) throw new Error(message);
}

await waitFor("the lists", "document.readyState === 'complete' && document.getElementById('sampler_name').options.length > 1", 30);
const models = await evaluate("[...document.getElementById('model').options].map((o) => o.value)");
check(models.length === 1 && models[0].startsWith("latent-demo"), `models: ${models}`);
const samplers = await evaluate("[...document.getElementById('sampler_name').options].map((o) => o.value)");
check(samplers.includes("Euler a") && samplers.includes("DPM++ 2M"), `samplers: ${samplers}`);

await evaluate(`
  document.getElementById('prompt').value = 'a yellow square on a black background';
  document.getElementById('steps').value = '60';
  document.getElementById('seed').value = '5';
  document.getElementById('sampler_name').value = 'Euler';
  document.getElementById('go').click();
  true`);
await waitFor("the progress", "document.getElementById('status').textContent.includes('step ')", 60);
await waitFor("the preview", "document.getElementById('preview').src.startsWith('data:image/png;base64,')", 60);
await waitFor("the picture", "document.querySelectorAll('#results img').length === 1 && document.querySelector('#results img').complete && document.querySelector('#results img').naturalWidth === 64", 120);
const caption = await evaluate("document.querySelector('#results figcaption').textContent");
check(caption.startsWith("a yellow square on a black background\nSteps: 60, Sampler: Euler,") && caption.includes("Seed: 5,"), `caption: ${caption}`);
check(await evaluate("document.getElementById('error').textContent") === "", "an error is shown");

// A bad request shows the server's reason.
await evaluate("document.getElementById('width').value = '70'; document.getElementById('go').click(); true");
await waitFor("the error", "document.getElementById('error').textContent.includes('width')", 30);

console.log("the web page in headless Chromium: all checks passed");
ws.close();
process.exit(0);
